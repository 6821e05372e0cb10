"""The finite NTK K(x1, x2) (n1·C × n2·C) from per-layer factors, never forming a per-sample Jacobian of the
factored layers ("structured derivatives": Novak, Sohl-Dickstein & Schoenholz 2022, Fast Finite Width NTK).

A Linear layer, or an ungrouped Conv2d with zero padding, applies its weight W (d_out × d_in) at S positions (the
tokens of a Linear on (b, ..., d_in) inputs; the output pixels of a convolution, its input patches unfolded to
d_in = c_in·k_h·k_w). With a_s the layer's input at position s and g_{c,s} = ∂f_c/∂(layer output at s), the
Jacobian row of output c in W is Σ_s g_{c,s} a_sᵀ and in the bias Σ_s g_{c,s}, so the layer adds

    K[(i,c), (j,c')] += Σ_{s,t} (g_{ic,s} · g_{jc',t}) (a_{is} · a_{jt} [W selected] + 1 [bias selected]),

S_i·S_j·(d_out + d_in) multiplications per pair of inputs instead of d_out·d_in (much less for 1 × 1 convolutions
and Linear layers; more for early convolutions with many pixels: :func:`kernel_cost` says which). The factors of an
input batch cost one forward pass (forward hooks keep a and add a zero ε to each layer's output) and C backward
passes (g = ∂f_c/∂ε). Every other selected parameter (normalisation weights, grouped convolutions, ...) adds
J_f(x1) J_f(x2)ᵀ from its per-sample Jacobians. Layers called more than once per forward pass are not factored.

Only modules whose computation is provably conv(a, W) + b with their own raw weight are factored: the stock
``nn.Linear`` / ``nn.Conv2d`` forward (a subclass that overrides it, as timm's weight-standardising ``StdConv2d``
does, is not), no forward hooks, no parametrization, weights held by no other module. What the structure cannot show
(a weight used outside its module's call) is caught by :meth:`LayerKernel.agrees`: the first layer-factor kernel of a
network is checked against NTK products on two inputs, and a disagreement warns once and falls back to NTK products.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..functional import FunctionalNetwork, relative_difference
from ..inputs import Inputs, inputs_at, length, map_leaves
from .ntk_operator import NTKOperator

__all__ = ["LayerFactors", "LayerKernel", "cheap_layer_kernel", "dense_ntk"]


@dataclass
class LayerFactors:
    """Factors of an input batch (b, ...): per factored layer its inputs a (b, S, d_in) and output derivatives
    g (b, C, S, d_out); ``rest`` the per-sample Jacobians (b, C, p_rest) of the other selected parameters."""

    inputs: list[Tensor]
    grads: list[Tensor]
    rest: Tensor | None


@dataclass(frozen=True)
class _Layer:
    name: str
    module: nn.Module
    weight: bool  # the weight is selected
    bias: bool  # the bias is selected


def _factorable(module: nn.Module) -> bool:
    """Whether ``module`` computes conv(a, W) + b (or a Wᵀ + b) with its raw weight, by torch's own code."""
    stock = next((kind for kind in (nn.Linear, nn.Conv2d) if isinstance(module, kind)), None)
    if stock is None or "forward" in vars(module) or type(module).forward is not stock.forward:
        return False
    if module._forward_hooks or module._forward_pre_hooks or parametrize.is_parametrized(module):
        return False
    if stock is nn.Linear:
        return True
    return bool(
        getattr(type(module), "_conv_forward", None) is nn.Conv2d._conv_forward
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


#: ``FunctionalNetwork.shortcut_checks`` key of the layer-factor kernel's check against NTK products.
CHECK = "layer-factor kernel"


class LayerKernel:
    """K(x1, x2) of a :class:`FunctionalNetwork` at θ0 from layer factors (module docstring).

    ``layers`` are the factored layers; ``rest_names`` the selected parameters outside them, whose Jacobians come
    from a FunctionalNetwork of those alone. Built for the network's current dtype and weights.
    """

    def __init__(self, network: FunctionalNetwork):
        self.network = network
        part = network.module  # (a split's suffix holds the same submodules, by the same names)
        selected = set(network.names)
        holders: dict[int, int] = {}  # id(parameter) -> how many modules hold it
        for _, module in part.named_modules(remove_duplicate=False):
            for param in module.parameters(recurse=False):
                holders[id(param)] = holders.get(id(param), 0) + 1
        self.layers = []
        for name, module in part.named_modules():
            if not _factorable(module) or any(holders[id(t)] > 1 for t in module.parameters(recurse=False)):
                continue
            prefix = f"{name}." if name else ""
            weight = f"{prefix}weight" in selected
            bias = module.bias is not None and f"{prefix}bias" in selected
            if weight or bias:
                self.layers.append(_Layer(name, module, weight, bias))
        covered = {
            f"{layer.name}.{kind}" if layer.name else kind
            for layer in self.layers
            for kind, on in (("weight", layer.weight), ("bias", layer.bias))
            if on
        }
        self.rest_names = [n for n in network.names if n not in covered]
        self._rest: FunctionalNetwork | None = None

    @property
    def rest(self) -> FunctionalNetwork | None:
        """A FunctionalNetwork of the parameters outside the factored layers (same weights, the same frozen prefix
        and prefix cache: ``FunctionalNetwork.restricted``), or None."""
        if self._rest is None and self.rest_names:
            self._rest = self.network.restricted(self.rest_names)
        return self._rest

    def cost(self, x: Inputs) -> float:
        """Multiplications per pair of inputs and pair of outputs, over p (the per-sample Jacobian path's): below 1
        this path is the cheaper; from one forward pass on x[:1] (the positions S of each layer), after the frozen
        prefix on all of x (cached: x is about to be factored whole)."""
        self.network.features(x)
        factors = self.factors(inputs_at(x, slice(0, 1)))
        c = factors.grads[0].shape[1] if factors.grads else 1
        total = 0.0
        for a, g, layer in zip(factors.inputs, factors.grads, self.layers):
            s = a.shape[1]
            total += s * s * (g.shape[-1] + (a.shape[-1] if layer.weight else 0) / c**2 + 1)
        rest = 0 if self.rest is None else self.rest.num_params
        return (total + rest) / self.network.num_params

    def agrees(self, x: Inputs) -> bool:
        """Whether this network's layer-factor kernel equals NTK products on x[:2] (relative 10·√eps), checked once
        per network (``FunctionalNetwork.shortcut_checks``); on a disagreement warns once, and is False from then on."""
        checks = self.network.shortcut_checks
        if CHECK not in checks:
            two = inputs_at(x, slice(0, 2))
            with torch.no_grad():
                first = self.factors(two)
                ours = self.kernel(first, first)
                reference = NTKOperator.of(two, two, network=self.network, num_outputs=ours.shape[0] // length(two))
                difference = relative_difference(ours, reference.to_dense())
            checks[CHECK] = difference <= 10 * torch.finfo(self.network.dtype).eps ** 0.5
            if not checks[CHECK]:
                warnings.warn(
                    f"the layer-factor kernel of this network disagrees with NTK products (relative "
                    f"difference {difference:.2g}): a factored Linear / Conv2d does not compute its output from its "
                    "own weight alone (a weight used elsewhere too?); using NTK products or per-sample Jacobians "
                    "instead (correct, slower)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return checks[CHECK]

    def factors(self, x: Inputs) -> LayerFactors:
        """:class:`LayerFactors` of b inputs x: one forward pass and C backward passes."""
        net = self.network
        inputs: dict[str, Tensor] = {}
        epsilons: dict[str, Tensor] = {}
        calls = dict.fromkeys((layer.name for layer in self.layers), 0)

        def hook(name: str) -> Callable[[nn.Module, tuple, Tensor], Tensor]:
            def keep(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
                calls[name] += 1
                inputs[name] = args[0].detach()
                epsilons[name] = torch.zeros_like(output, requires_grad=True)
                return output + epsilons[name]

            return keep

        h = map_leaves(Tensor.detach, net.features(x))  # first: the first use of a split checks it with a forward pass
        handles = [layer.module.register_forward_hook(hook(layer.name)) for layer in self.layers]
        with torch.enable_grad():
            try:
                out = net._head(h, x)
            finally:
                for handle in handles:
                    handle.remove()
            if any(count != 1 for count in calls.values()):
                raise NotImplementedError(
                    "a factored layer ran more than once in one forward pass (a shared "
                    "module): use variance_path='jacobians'"
                )
            order = [epsilons[layer.name] for layer in self.layers]
            per_output = [
                torch.autograd.grad(out[:, c].sum(), order, retain_graph=c + 1 < out.shape[1], allow_unused=True)
                for c in range(out.shape[1])
            ]
        grads, patches = [], []
        for k, layer in enumerate(self.layers):
            g = torch.stack([torch.zeros_like(order[k]) if d[k] is None else d[k] for d in per_output], 1)
            a = inputs[layer.name]
            if isinstance(layer.module, nn.Conv2d):
                m = layer.module
                padding = m.padding
                assert not isinstance(padding, str)  # string paddings are not factored (_factorable)
                a = nn.functional.unfold(a, m.kernel_size, m.dilation, padding, m.stride).mT  # (b, S, d_in)
                g = g.flatten(3).mT  # (b, C, S, d_out)
            else:
                a = a.reshape(a.shape[0], -1, a.shape[-1])
                g = g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])
            patches.append(a)
            grads.append(g.detach())
        rest = None
        if self.rest is not None:
            rest = torch.cat(list(self.rest.jacobian_chunks(x)))
        return LayerFactors(patches, grads, rest)

    def kernel(self, first: LayerFactors, second: LayerFactors, block_elements: int = 2**25) -> Tensor:
        """K (b1·C × b2·C) between two inputs' factors, rows interleaved (input-major), in blocks of the first's
        rows so that no intermediate exceeds ``block_elements``."""
        b1, b2 = _rows(first), _rows(second)
        c = _outputs(first)
        widest = max([a.shape[1] * a2.shape[1] for a, a2 in zip(first.inputs, second.inputs)] or [1])
        step = max(1, block_elements // (c * c * b2 * widest))
        blocks = []
        for start in range(0, b1, step):
            rows = slice(start, min(start + step, b1))
            k = torch.zeros(rows.stop - rows.start, c, b2, c, dtype=self.network.dtype, device=self.network.device)
            for a1, a2, g1, g2, layer in zip(first.inputs, second.inputs, first.grads, second.grads, self.layers):
                a1, g1 = a1[rows], g1[rows]
                shared = (
                    torch.einsum("isd,jtd->isjt", a1, a2)
                    if layer.weight
                    else a1.new_zeros(a1.shape[0], a1.shape[1], b2, a2.shape[1])
                )
                if layer.bias:
                    shared = shared + 1
                outer = (g1.flatten(0, 2) @ g2.flatten(0, 2).mT).reshape(*g1.shape[:3], *g2.shape[:3])
                k += torch.einsum("icsjet,isjt->icje", outer, shared)
            if first.rest is not None:
                k += torch.einsum("icp,jep->icje", first.rest[rows], second.rest)
            blocks.append(k.reshape(k.shape[0] * c, b2 * c))
        return torch.cat(blocks)

    def diagonal_blocks(self, factors: LayerFactors) -> Tensor:
        """The C × C blocks K[(i,·), (i,·)] of each input (b, C, C)."""
        b = _rows(factors)
        c = _outputs(factors)
        out = torch.zeros(b, c, c, dtype=self.network.dtype, device=self.network.device)
        for a, g, layer in zip(factors.inputs, factors.grads, self.layers):
            shared = a @ a.mT if layer.weight else a.new_zeros(b, a.shape[1], a.shape[1])
            if layer.bias:
                shared = shared + 1
            out += torch.einsum("icsd,ietd,ist->ice", g, g, shared)
        if factors.rest is not None:
            out += factors.rest @ factors.rest.mT
        return out


def _rest(factors: LayerFactors) -> Tensor:
    if factors.rest is None:
        raise ValueError("layer factors hold neither a factored layer nor another parameter")
    return factors.rest


def _rows(factors: LayerFactors) -> int:
    return factors.inputs[0].shape[0] if factors.inputs else _rest(factors).shape[0]


def _outputs(factors: LayerFactors) -> int:
    """C, the network's outputs."""
    return factors.grads[0].shape[1] if factors.grads else _rest(factors).shape[1]


def cheap_layer_kernel(network: FunctionalNetwork, x: Inputs) -> LayerKernel | None:
    """A :class:`LayerKernel` of ``network`` when its cost on x is at most half of p per pair of rows (the factors
    are then clearly cheaper than NTK products) and it :meth:`~LayerKernel.agrees` with NTK products, else None (no
    factorable layer, a layer called twice, dearer, or wrong)."""
    kernel = LayerKernel(network)
    try:
        return kernel if kernel.layers and kernel.cost(x) <= 0.5 and kernel.agrees(x) else None
    except NotImplementedError:  # a layer called twice per forward pass
        return None


def dense_ntk(
    network: FunctionalNetwork, x1: Inputs, x2: Inputs | None = None, kernel: LayerKernel | None | bool = True
) -> Tensor:
    """The NTK K(x1, x2) (n1·C × n2·C, rows i·C + c; x2 defaults to x1) at θ0 as a dense matrix: from the layer
    factors of ``kernel`` (True: :func:`cheap_layer_kernel` decides; None or False: never), else from n2·C NTK
    products (:class:`~ntkgp.operators.NTKOperator`)."""
    x2 = x1 if x2 is None else x2
    if kernel is True:
        kernel = cheap_layer_kernel(network, x2)
    with torch.no_grad():
        if not kernel:
            return NTKOperator.of(x1, x2, network=network, num_outputs=network.num_outputs(x1)).to_dense()
        second = kernel.factors(x2)
        first = second if x1 is x2 else kernel.factors(x1)
        return kernel.kernel(first, second)
