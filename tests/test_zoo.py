"""The networks users bring, tested against plain autograd: HuggingFace (dict inputs with padding masks, ModelOutput),
timm, torchvision, recurrent networks, tuple and dict inputs, LoRA adapters.

Every model is built offline from a config with random weights (no download), tiny, in float64. The reference
Jacobian J (n·C × p) is computed row by row with ``torch.autograd.grad`` on the module itself (parameters that
require grad, the network's default attention backend): independent of torch.func and of the math attention backend
ntkgp selects. Each model must give K = J Jᵀ, its diagonal and K v to 1e-8 (relative), and NTKGP's prediction must
equal the dense closed form to 1e-8. The whole file takes about 10 s on 2 CPU cores (36 tests, 10.4 s measured).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import DictModel
from torch import nn

from ntkgp import LQF, NTKGP, FunctionalNetwork, Laplace, ntk_operator
from ntkgp.functional.network_output import select_output
from ntkgp.inputs import call_arguments, inputs_at

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
peft = pytest.importorskip("peft")

TOL = 1e-8


@dataclass
class Case:
    model: nn.Module
    x: Any  # the inputs as the user holds them
    params: list[str] | None = None
    output: Callable[[Any], torch.Tensor] | None = None


def autograd_jacobian(model: nn.Module, x: Any, names: list[str], output: Callable | None = None) -> torch.Tensor:
    """J (n·C × p) over the parameters ``names``, one autograd backward pass per output entry (rows i·C + c)."""
    named = dict(model.named_parameters())
    chosen = [named[n] for n in names]
    with torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(False)
        for p in chosen:
            p.requires_grad_(True)
        args, kwargs = call_arguments(x)
        out = select_output(model(*args, **kwargs), output)
        out = out.reshape(out.shape[0], -1)
        rows = []
        for i in range(out.shape[0]):
            for c in range(out.shape[1]):
                grads = torch.autograd.grad(out[i, c], chosen, retain_graph=True, allow_unused=True)
                rows.append(
                    torch.cat(
                        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, chosen)]
                    )
                )
    return torch.stack(rows)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _ids(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _padded(n: int, length: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Token ids with a 2-D padding mask whose rows end in padding (HuggingFace's data-dependent mask code)."""
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, length // 2 :] = 0
    ids = _ids(n, length, vocab, seed).masked_fill(mask == 0, 0)  # the padding token, id 0 (padding_idx)
    return {"input_ids": ids, "attention_mask": mask}


def _images(n: int, size: int, seed: int, channels: int = 3) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def hf_bert(n: int = 3, seed: int = 0) -> Case:
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    return Case(transformers.BertForSequenceClassification(config), _padded(n, 6, 40, seed))


def hf_distilbert(n: int = 3, seed: int = 0) -> Case:
    config = transformers.DistilBertConfig(
        vocab_size=40, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16, num_labels=2
    )
    return Case(transformers.DistilBertForSequenceClassification(config), _padded(n, 6, 40, seed))


def hf_vit(n: int = 2, seed: int = 0) -> Case:
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    return Case(transformers.ViTForImageClassification(config), _images(n, 16, seed))


class GPT2LastToken(nn.Module):
    """GPT-2 with a small head on the last token's hidden state."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.GPT2Config(
            vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
        )
        self.gpt = transformers.GPT2Model(config)
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.gpt(input_ids=input_ids).last_hidden_state[:, -1])


def hf_gpt2(n: int = 3, seed: int = 0) -> Case:
    return Case(GPT2LastToken(), _ids(n, 6, 40, seed))


def timm_vit(n: int = 2, seed: int = 0) -> Case:
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1, num_classes=3
    )
    return Case(model, _images(n, 32, seed), params=["blocks.0.attn.", "head."])


def timm_deit(n: int = 2, seed: int = 0) -> Case:
    model = timm.create_model(
        "deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1, num_classes=3
    )
    return Case(model, _images(n, 32, seed), params=["blocks.0.", "head."])


def timm_bit(n: int = 2, seed: int = 0) -> Case:  # ResNetV2 / BiT: StdConv2d standardises its weight in forward
    model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=3)
    return Case(model, _images(n, 32, seed), params=["stages.3.blocks.2.conv3.", "head."])


def timm_convnext(n: int = 2, seed: int = 0) -> Case:
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=3)
    return Case(model, _images(n, 32, seed), params=["stages.3.blocks.1.", "head."])


def timm_efficientnet(n: int = 2, seed: int = 0) -> Case:
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=3)
    return Case(model, _images(n, 32, seed), params=["blocks.6.", "conv_head.", "classifier."])


def torchvision_vit(n: int = 2, seed: int = 0) -> Case:
    from torchvision.models import VisionTransformer

    model = VisionTransformer(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=3
    )
    return Case(model, _images(n, 16, seed))


def torchvision_swin(n: int = 2, seed: int = 0) -> Case:
    from torchvision.models.swin_transformer import SwinTransformer

    model = SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2], num_classes=3
    )
    return Case(model, _images(n, 16, seed))


class TokenEncoder(nn.Module):
    """Token ids -> embedding -> nn.TransformerEncoder (torch's fast path when it may) -> mean -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


def token_encoder(n: int = 3, seed: int = 0) -> Case:
    return Case(TokenEncoder(), _ids(n, 5, 20, seed))


def lstm(n: int = 3, seed: int = 0) -> Case:  # returns (outputs, (h, c)): output= says which tensor is f
    model = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(n, 5, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return Case(model, x, output=lambda out: out[0][:, -1])


def gru(n: int = 3, seed: int = 0) -> Case:
    model = nn.GRU(3, 4, batch_first=True)
    x = torch.randn(n, 5, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return Case(model, x, output=lambda out: out[1][-1])


class ImageAndMeta(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.meta = nn.Linear(2, 4)
        self.head = nn.Linear(2 * 4 * 4 + 4, 3)

    def forward(self, img: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.tanh(self.conv(img)).flatten(1), torch.tanh(self.meta(meta))], 1))


def tuple_inputs(n: int = 4, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    return Case(
        ImageAndMeta(),
        (
            torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64),
            torch.randn(n, 2, generator=g, dtype=torch.float64),
        ),
    )


def dict_inputs(n: int = 4, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    x = {
        "features": torch.randn(n, 4, generator=g, dtype=torch.float64),
        "ids": torch.randint(0, 10, (n, 3), generator=g),
        "keep": torch.rand(n, 3, generator=g) > 0.3,
    }
    return Case(DictModel(), x)


def lora_bert(n: int = 3, seed: int = 0) -> Case:
    """peft LoRA adapters on BERT's query and value (random lora_B, so that J in lora_A is not zero)."""
    base = hf_bert(n, seed).model
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False)
    return Case(peft.get_peft_model(base, config), _padded(n, 6, 40, seed))


ZOO = {
    "hf-bert (dict, padding mask)": hf_bert,
    "hf-distilbert (dict, padding mask)": hf_distilbert,
    "hf-vit": hf_vit,
    "hf-gpt2 (last token)": hf_gpt2,
    "timm-vit": timm_vit,
    "timm-deit": timm_deit,
    "timm-resnetv2-bit (StdConv2d)": timm_bit,
    "timm-convnext": timm_convnext,
    "timm-efficientnet": timm_efficientnet,
    "torchvision-vit": torchvision_vit,
    "torchvision-swin": torchvision_swin,
    "nn.TransformerEncoder (token ids)": token_encoder,
    "lstm (output=)": lstm,
    "gru (output=)": gru,
    "tuple inputs": tuple_inputs,
    "dict inputs (mixed dtypes)": dict_inputs,
    "peft-lora-bert (adapters only)": lora_bert,
}


def _built(name: str, **kwargs: Any) -> tuple[Case, FunctionalNetwork]:
    torch.manual_seed(0)
    case = ZOO[name](**kwargs)
    case.model = case.model.double().eval()
    return case, FunctionalNetwork(case.model, case.params, output=case.output)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_kernel_equals_autograd(name: str) -> None:
    case, net = _built(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one-at-a-time fallbacks (LSTM, HuggingFace masks) say so; tested below
        op = ntk_operator(net, case.x)
        dense, diagonal = op.to_dense(), op.diagonal()
        v = torch.randn(op.shape[-1], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        product = op @ v
    jac = autograd_jacobian(case.model, case.x, net.names, case.output)
    reference = jac @ jac.T
    assert rel(dense, reference) < TOL
    assert rel(diagonal, reference.diagonal()) < TOL
    assert rel(product, reference @ v) < TOL


PREDICTIVE = [
    "hf-bert (dict, padding mask)",
    "hf-gpt2 (last token)",
    "torchvision-vit",
    "tuple inputs",
    "dict inputs (mixed dtypes)",
    "peft-lora-bert (adapters only)",
    "lstm (output=)",
]


@pytest.mark.parametrize("space", ["function", "parameter"])
@pytest.mark.parametrize("name", PREDICTIVE)
def test_zoo_ntkgp_equals_the_dense_closed_form(name: str, space: str) -> None:
    case, net = _built(name, n=4)
    test = ZOO[name](n=2, seed=1).x
    noise = 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f_train, f_test = net.outputs(case.x), net.outputs(test)
        y = f_train + torch.randn(f_train.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        gp = NTKGP(net, case.x, y, space=space, noise=noise)
        prediction = gp.predict(test)
    j, js = (autograd_jacobian(case.model, x, net.names, case.output) for x in (case.x, test))
    system = j @ j.T + noise * torch.eye(j.shape[0], dtype=torch.float64)
    cross = js @ j.T
    mean = f_test.reshape(-1) + cross @ torch.linalg.solve(system, (y - f_train).reshape(-1))
    variance = (js * js).sum(1) - (cross * torch.linalg.solve(system, cross.T).T).sum(1)
    c = f_train.shape[1]
    assert rel(prediction.mean.reshape(-1, c), mean.reshape(-1, c)) < TOL
    assert rel(prediction.variance.reshape(-1, c), variance.reshape(-1, c)) < 1e-7


def test_lora_adapters_are_the_default_selection_and_laplace_and_lqf_over_them_are_exact() -> None:
    """peft leaves only the adapters trainable: the default selection is exactly them; Laplace's GLM predictive and
    LQF's closed form over them equal their dense formulas from the autograd Jacobian."""
    case, net = _built("peft-lora-bert (adapters only)", n=4)
    adapters = [n for n, p in case.model.named_parameters() if "lora_" in n]
    assert net.names == adapters and len(adapters) == 8  # A and B of query and value in 2 layers
    labels = torch.tensor([0, 1, 2, 1])
    test = ZOO["peft-lora-bert (adapters only)"](n=2, seed=1).x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        laplace = Laplace(case.model, "regression", prior_precision=2.0, noise=0.3)
        targets = net.outputs(case.x) + 0.1
        laplace.fit(case.x, targets)
        latent = laplace.predict(test)
        lqf = LQF(case.model, weight_decay=0.5, preconditioner=None).fit(case.x, labels, solver="closed_form")
        lqf_out = lqf.predict(test)
    j, js = (autograd_jacobian(case.model, x, net.names) for x in (case.x, test))
    f_train, f_test = net.outputs(case.x), net.outputs(test)
    # Laplace (regression, exact for the linear model): Σ = (JᵀJ/σ² + δI)⁻¹, MAP Δ = Σ Jᵀ(y − f0)/σ²
    p = j.shape[1]
    sigma = torch.linalg.inv(j.T @ j / 0.3 + 2.0 * torch.eye(p, dtype=torch.float64))
    delta = sigma @ j.T @ (targets - f_train).reshape(-1) / 0.3
    assert rel(latent.mean.reshape(-1), f_test.reshape(-1) + js @ delta) < 1e-8
    assert rel(latent.variance.reshape(-1), ((js @ sigma) * js).sum(1)) < 1e-8
    # LQF closed form (MSE, α·one-hot targets): δ = Jᵀ(K + (λ/2)I)⁻¹(αY − f0)
    onehot = lqf.alpha * nn.functional.one_hot(labels, 3).to(torch.float64)
    coef = torch.linalg.solve(
        j @ j.T + 0.25 * torch.eye(j.shape[0], dtype=torch.float64), (onehot - f_train).reshape(-1)
    )
    assert rel(lqf_out.reshape(-1), f_test.reshape(-1) + js @ (j.T @ coef)) < 1e-8


def test_peft_default_initialisation_is_reported() -> None:
    """peft's default LoRA initialisation zeroes lora_B: J in lora_A is identically zero there, which is said."""
    base = hf_bert().model.double().eval()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query", "value"])).eval()
    with pytest.warns(UserWarning, match=r"LoRA matrices lora_A .* lora_B that is all zeros.*identically zero"):
        FunctionalNetwork(model)


def test_huggingface_masks_fall_back_once_with_one_warning() -> None:
    """BERT's 2-D padding mask is turned into an attention mask by Python branches on its values: per-sample Jacobians
    (vmap over inputs) fall back to one input at a time, and the traced linearisation to plain JVPs, each with one
    warning, and stay exact."""
    case, net = _built("hf-bert (dict, padding mask)", n=4)
    with pytest.warns(RuntimeWarning, match="per-sample Jacobians.*branches in Python") as record:
        diagonal = ntk_operator(net, case.x).diagonal()
        ntk_operator(net, case.x).diagonal()
    assert sum("per-sample Jacobians" in str(w.message) for w in record) == 1
    with pytest.warns(RuntimeWarning, match="traced linearised Jacobian-vector products"), net.linearised(case.x):
        v = torch.randn(net.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        product = net.jvp(case.x, v.unsqueeze(0))[0]
    jac = autograd_jacobian(case.model, case.x, net.names)
    assert rel(diagonal, (jac * jac).sum(1)) < TOL
    assert rel(product.reshape(-1), jac @ v) < TOL


def test_attention_settings_are_restored() -> None:
    """Inside ntkgp's products the math backend runs and MHA's fast path is off; afterwards the caller's settings are
    back, also after an error."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    case, net = _built("nn.TransformerEncoder (token ids)")
    before = torch.backends.mha.get_fastpath_enabled()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        outer = torch._C._get_flash_sdp_enabled(), torch._C._get_math_sdp_enabled()
        ntk_operator(net, case.x).to_dense()
        assert (torch._C._get_flash_sdp_enabled(), torch._C._get_math_sdp_enabled()) == outer
    assert torch.backends.mha.get_fastpath_enabled() == before
    with pytest.raises(RuntimeError, match="embedding"):  # float ids: the network fails inside the context
        net(inputs_at(case.x, slice(0, 1)).double())
    assert torch.backends.mha.get_fastpath_enabled() == before


def test_ops_without_forward_rule_name_the_module() -> None:
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag = nn.EmbeddingBag(20, 4, mode="mean")
            self.head = nn.Linear(4, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.bag(ids))

    model = Bag().double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NotImplementedError, match=r"_embedding_bag, called by the module bag \(EmbeddingBag\)"):
            ntk_operator(model, torch.randint(0, 20, (3, 5))).to_dense()


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("hf-bert (dict, padding mask)", "classifier"),
        ("hf-vit", "classifier"),
        ("hf-gpt2 (last token)", "head"),
        ("timm-vit", "head"),
        ("timm-convnext", "head.fc"),
        ("timm-efficientnet", "classifier"),
        ("torchvision-vit", "heads.head"),
        ("tuple inputs", "head"),
    ],
)
def test_last_layer_is_the_head_wherever_params_is_accepted(name: str, layer: str) -> None:
    """params="last_layer": the last module holding parameters, by the network's structure; the same word in every
    entry point (they all select through select_parameters)."""
    from ntkgp import Laplace

    case, _ = _built(name)
    net = FunctionalNetwork(case.model, "last_layer")
    assert net.names == [f"{layer}.weight", f"{layer}.bias"]
    assert Laplace(case.model, "regression", params="last_layer").network.names == net.names


def test_last_layer_of_a_tied_head_goes_by_its_first_name() -> None:
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=8, n_layer=1,
                                                                 n_head=2, bos_token_id=0, eos_token_id=0))  # fmt: skip
    assert FunctionalNetwork(model.double().eval(), "last_layer").names == ["transformer.wte.weight"]
