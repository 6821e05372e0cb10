"""Which parameters a linearisation is in: names or module prefixes, in the module's own order."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["LAST_LAYER", "last_layer", "select_parameters"]

#: the word that selects the network's last layer wherever ``params`` is accepted
LAST_LAYER = "last_layer"


def last_layer(module: nn.Module) -> list[str]:
    """The parameter names of the network's last layer: the last module, in registration order (``named_modules``),
    that holds parameters itself — ``fc`` of a ResNet, ``classifier`` of a HuggingFace classifier, ``heads.head`` of a
    torchvision ViT, ``head`` of a timm model. Registration order follows the code that builds the network, not the
    order its forward pass runs the modules: check ``FunctionalNetwork(...).names`` on an unusual network."""
    holders = [(name, m) for name, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not holders:
        raise ValueError("params='last_layer': the network holds no parameter")
    canonical = {id(t): n for n, t in module.named_parameters()}  # a tied weight goes by its first name
    return [canonical[id(t)] for t in holders[-1][1].parameters(recurse=False)]


def select_parameters(module: nn.Module, params: Sequence[str] | str | None) -> list[str]:
    """Names of the parameters to linearise in.

    ``None`` selects every parameter with ``requires_grad``; otherwise each entry is a full parameter
    name (``"fc.weight"``), a module-name prefix (``"4."``, ``"fc."`` or ``"fc"``) or ``"last_layer"`` (the
    parameters of :func:`last_layer`, unless the network has a module of that name). The names come in
    ``module.named_parameters()`` order whatever the order of the entries, so the flat vector θ agrees
    with :func:`torch.nn.utils.parameters_to_vector` over the same parameters.
    """
    named = dict(module.named_parameters())
    if params is None:
        names = [n for n, t in named.items() if t.requires_grad]
        if not names:
            raise ValueError("the network has no parameter with requires_grad=True; pass params=[...] explicitly")
        return names
    if isinstance(params, str):
        params = [params]
    if not isinstance(params, Sequence) or not params:
        raise ValueError(
            f"params must be None (all trainable parameters) or a non-empty list of parameter names or "
            f"module prefixes, got {params!r}"
        )
    chosen: set[str] = set()
    for entry in params:
        if not isinstance(entry, str):
            raise TypeError(
                f"params entries must be strings (parameter names or module prefixes such as 'fc.'), got "
                f"{type(entry).__name__} {entry!r}"
            )
        prefix = entry if entry.endswith(".") else entry + "."
        hits = [n for n in named if n == entry or n.startswith(prefix)]
        if not hits and entry == LAST_LAYER:
            hits = last_layer(module)
        if not hits:
            modules = sorted({n.rsplit(".", 1)[0] + "." for n in named if "." in n})
            raise ValueError(
                f"no parameter of the network matches {entry!r}; parameters are named like "
                f"{list(named)[:6]} and module prefixes are {modules[:12]}"
            )
        chosen.update(hits)
    return [n for n in named if n in chosen]
