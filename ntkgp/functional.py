"""The functional layer: a network as a pure function of a flat parameter vector, and its Jacobian products.

Everything above this module (operators, GP models, posteriors) reaches the network's Jacobian only
through :class:`FunctionalNetwork`: ``jvp`` (J V, forward mode), ``vjp`` (Jᵀ U, reverse mode) and
``jacobian_chunks`` (per-sample Jacobians of a few inputs at a time, for diagonals and rows).

Shapes: n inputs, C outputs per input, p selected parameters, k tangent/cotangent vectors.
"""

from __future__ import annotations

import builtins
import copy
import re
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, linearize, vjp, vmap

from .frozen_prefix import NetworkSplit, split_network
from .validation import (
    as_count,
    check_eval_mode,
    check_finite,
    check_finite_tensors,
    check_precision,
    check_tensor,
    in_transform,
)

__all__ = ["FunctionalNetwork", "as_functional_network", "map_blocks", "relative_difference", "select_parameters"]

_NO_FORWARD_AD = re.compile(
    r"forward AD with (\S+) that does not support it|no forward AD formula for (\S+)"
    r"|derivative for (\S+) is not implemented",
    re.IGNORECASE,
)
_NETWORK_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


class IntegerOutputsError(TypeError):
    """The network's outputs are not floating (raised as it is, not as a failure on the inputs' shape)."""


#: what a vmapped product raises where an op has no (working) batching rule
_BATCHING_ERRORS = (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError)


def select_parameters(module: nn.Module, params: Sequence[str] | str | None) -> list[str]:
    """Names of the parameters to linearise in.

    ``None`` selects every parameter with ``requires_grad``; otherwise each entry is a full parameter
    name (``"fc.weight"``) or a module-name prefix (``"4."``, ``"fc."`` or ``"fc"``). The names come in
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
        if not hits:
            modules = sorted({n.rsplit(".", 1)[0] + "." for n in named if "." in n})
            raise ValueError(
                f"no parameter of the network matches {entry!r}; parameters are named like "
                f"{list(named)[:6]} and module prefixes are {modules[:12]}"
            )
        chosen.update(hits)
    return [n for n in named if n in chosen]


def _missing_forward_rule(err: Exception) -> str | None:
    """The op named in a 'no forward-mode rule' error, or None if ``err`` is something else."""
    match = _NO_FORWARD_AD.search(str(err))
    if match:
        return next(g for g in match.groups() if g)
    if "implement the jvp function for custom autograd.Function" in str(err):
        return "a custom autograd.Function with no jvp"
    return None


def _vjp(f: Callable[[Tensor], Tensor], primal: Tensor) -> tuple[Tensor, Callable[[Tensor], tuple[Tensor, ...]]]:
    """``torch.func.vjp`` of a function with no auxiliary output (its stubs type the result as a triple)."""
    out, vjp_fn = cast(tuple[Tensor, Callable[[Tensor], tuple[Tensor, ...]]], vjp(f, primal))
    return out, vjp_fn


def relative_difference(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / max(‖a‖, ‖b‖) (0 when both are zero)."""
    a, b = a.detach(), b.detach()
    scale = max(float(a.norm()), float(b.norm()))
    return float((a - b).norm()) / scale if scale > 0 else 0.0


class FunctionalNetwork:
    """A frozen snapshot of ``module`` as ``f(x, theta) -> (n, C)`` over the selected parameters.

    The module must be in eval mode (BatchNorm and Dropout), now and whenever the snapshot is used; it
    is never modified. What is snapshotted: the selected parameters (copied into the flat vector
    ``theta0`` (p,)), the other parameters and all buffers (BatchNorm statistics): copied, so that
    later changes to the module — an optimizer step, ``load_state_dict``, a BatchNorm update, writes
    through ``.data`` — do not change this linearisation. That copy costs the memory of the module's
    frozen parameters and buffers; ``copy_frozen=False`` shares the frozen parameters with the module
    instead (buffers are still copied) and checks their version counters at every use, so an in-place
    change (optimizer step, ``load_state_dict``, ``torch.no_grad()`` updates) raises; writes through
    ``.data`` bypass version counters and are not seen then. Not snapshotted: the module's code and
    structure (its ``forward``, submodules, attributes that are not parameters or buffers).

    Batched products (``vmap`` over vectors) are checked against one-vector products at their first use
    (some ops have wrong batching rules: ``torch.cdist``'s backward on torch 2.13/2.14); a disagreement
    warns and switches that product to one vector at a time.

    The frozen prefix — the largest first part of the network that depends on no selected parameter
    (:mod:`ntkgp.frozen_prefix`) — is evaluated once per input tensor and its output h kept (up to
    ``feature_cache_bytes``, least recently used first out); every product then runs through the rest only.
    The split is checked against the whole network on the first inputs; ``split`` says where it cut (None:
    no split). Inputs that require grad are never cached (gradients in x flow through the prefix).

    Args:
        module: the network; its output for x of shape (n, ...) is (n,) or (n, C, ...) (flattened to C).
        params: parameter names or module prefixes, see :func:`select_parameters`.
        chunk_size: tangents/cotangents pushed through the network at once (bounds memory).
        jacobian_chunk_elements: bound on b·C·p for per-sample Jacobian chunks.
        copy_frozen: copy the non-selected parameters (default) or share them with the module.
        frozen_prefix: find and cache the frozen prefix (default True); False runs the whole network always.
        feature_cache_bytes: memory for the prefix outputs of recent input tensors (default 1 GiB).
    """

    def __init__(
        self,
        module: nn.Module,
        params: Sequence[str] | str | None = None,
        chunk_size: int = 32,
        jacobian_chunk_elements: int = 2**24,
        copy_frozen: bool = True,
        frozen_prefix: bool = True,
        feature_cache_bytes: int = 2**30,
    ):
        if not isinstance(module, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(module).__name__}")
        check_eval_mode(module)
        self.chunk_size = as_count(chunk_size, "chunk_size")
        self.jacobian_chunk_elements = as_count(jacobian_chunk_elements, "jacobian_chunk_elements")
        self.module = module
        self.names = select_parameters(module, params)
        named = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        check_finite_tensors({n: named[n] for n in self.names}, "parameter")
        check_finite_tensors({n: t for n, t in named.items() if n not in self.names}, "frozen parameter")
        check_finite_tensors(buffers, "buffer")
        check_precision(named[self.names[0]].dtype, "the network's parameters")
        self.shapes = [named[n].shape for n in self.names]
        self.numels = [named[n].numel() for n in self.names]
        self.theta0 = torch.cat([named[n].detach().reshape(-1) for n in self.names])
        frozen = {n: t.detach() for n, t in named.items() if n not in self.names}
        self.frozen = {n: t.clone() for n, t in frozen.items()} if copy_frozen else frozen
        self._shared_versions = None if copy_frozen else {n: t._version for n, t in frozen.items()}
        self.buffers = {n: t.detach().clone() for n, t in buffers.items()}
        if not isinstance(frozen_prefix, bool):
            raise TypeError(f"frozen_prefix must be True or False, got {frozen_prefix!r}")
        self.feature_cache_bytes = as_count(feature_cache_bytes, "feature_cache_bytes", minimum=0)
        self.split: NetworkSplit | None = split_network(module, self.names) if frozen_prefix else None
        self._split_checked = False
        self._reset_checks()

    def _reset_checks(self) -> None:
        """Forget what was learnt about the products (after a conversion: other kernels may run)."""
        self.use_double_vjp = False
        self._features: OrderedDict[int, tuple[weakref.ref, int, Tensor]] = OrderedDict()  # id(x) -> h
        self._linearisations: dict[int, tuple] = {}  # id(x) -> (x, vjp_fn, jvp_fn or None, output shape)
        self._shards: dict[int, tuple[weakref.ref, object]] = {}  # id(x) -> (x, process group)
        self._verified: set[str] = set()  # products whose batched path agreed with one vector at a time
        self._unbatched: set[str] = set()  # products that disagreed: computed one vector at a time
        #: shortcut name -> whether it agreed with the plain products when first checked (the layer-factor kernel)
        self.shortcut_checks: dict[str, bool] = {}

    @property
    def num_params(self) -> int:
        """p, the number of selected parameters."""
        return self.theta0.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.theta0.dtype

    @property
    def device(self) -> torch.device:
        return self.theta0.device

    # --- conversions, as nn.Module and torch.Tensor do them ------------------------------------------
    def _apply(self, fn: Callable[[Tensor], Tensor]) -> FunctionalNetwork:
        """Apply ``fn`` to every tensor of the snapshot, in place (what ``nn.Module.to`` does); returns self.

        When ``fn`` returns every tensor itself (a conversion to what it already is) nothing is reset."""
        theta0 = fn(self.theta0)
        frozen = {n: fn(t) for n, t in self.frozen.items()}
        buffers = {n: fn(t) for n, t in self.buffers.items()}
        old = [self.theta0, *self.frozen.values(), *self.buffers.values()]
        if all(a is b for a, b in zip(old, [theta0, *frozen.values(), *buffers.values()])):
            return self
        self.theta0, self.frozen, self.buffers = theta0, frozen, buffers
        self._shared_versions = None  # converted copies are no longer shared with the module
        self._reset_checks()
        return self

    def to(self, *args: Any, **kwargs: Any) -> FunctionalNetwork:
        """A converted copy, like ``Tensor.to`` / ``nn.Module.to``: floating tensors to the dtype, all to the
        device; self when nothing changes."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            check_precision(dtype, "dtype")
        if (device is None or torch.device(device) == self.device) and (dtype is None or dtype == self.dtype):
            return self

        def convert(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None, non_blocking=non_blocking)

        return copy.copy(self)._apply(convert)

    def double(self) -> FunctionalNetwork:
        return self.to(torch.float64)

    def float(self) -> FunctionalNetwork:
        return self.to(torch.float32)

    def cpu(self) -> FunctionalNetwork:
        return self.to("cpu")

    def cuda(self, device: int | str | torch.device | None = None) -> FunctionalNetwork:
        return self.to(f"cuda:{device}" if isinstance(device, int) else device or "cuda")

    def clone(self) -> FunctionalNetwork:
        """A copy with its own tensors."""
        return copy.copy(self)._apply(torch.clone)

    def module_copy(self, suffix: bool = False) -> nn.Module:
        """A copy of the module holding the snapshot (θ0, frozen weights, buffers), in eval mode, with
        ``requires_grad`` on the selected parameters only: for libraries that need a module (curvlinops).
        ``suffix``: only the part after the frozen prefix, whose inputs are :meth:`features` (the whole module
        when there is no split); its parameters keep the module's names."""
        self._check_state()
        source = self.split.suffix if suffix and self.split is not None else self.module
        module = copy.deepcopy(source).to(device=self.device, dtype=self.dtype)
        values = {**self.frozen, **self.buffers, **self.unflatten(self.theta0)}
        with torch.no_grad():
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                tensor.copy_(values[name])
        for name, param in module.named_parameters():
            param.requires_grad_(name in self.names)
        return module.eval()

    def at(self, theta: Tensor) -> FunctionalNetwork:
        """The same network linearised at ``theta`` (p,) instead of θ0 (a copy of it): frozen parameters, buffers,
        the split and the cache of prefix outputs are shared (the prefix depends on no selected parameter),
        linearisations at inputs are not. Re-linearising costs no copy of the module."""
        check_tensor(theta, "theta", f"({self.num_params},)")
        if theta.shape != self.theta0.shape or theta.dtype != self.dtype or theta.device != self.device:
            raise ValueError(
                f"theta must be a ({self.num_params},) {self.dtype} tensor on {self.device} (the selected "
                f"parameters, flat), got {tuple(theta.shape)} {theta.dtype} on {theta.device}"
            )
        moved = copy.copy(self)
        moved.theta0 = check_finite(theta.detach().clone(), "theta", "the weights diverged: lower the learning rate")
        moved._linearisations = {}
        return moved

    def restricted(self, names: Sequence[str]) -> FunctionalNetwork:
        """A FunctionalNetwork of some of the selected parameters (``names``) at the same weights, sharing this one's
        frozen prefix and its cache of prefix outputs (a prefix free of all the selected parameters is free of these):
        products in the subset never rerun the prefix; and what was found about batched products."""
        missing = [n for n in names if n not in self.names]
        if missing:
            raise ValueError(f"restricted takes selected parameters of this network; {missing[:3]} are not selected")
        sub = FunctionalNetwork(
            self.module_copy(), list(names), self.chunk_size, self.jacobian_chunk_elements, frozen_prefix=False
        )
        sub.split, sub._split_checked, sub._features = self.split, self._split_checked, self._features
        sub._unbatched = self._unbatched  # an op without a (right) batching rule lacks it in every subset
        return sub

    # --- the function ------------------------------------------------------------------------------
    def _check_state(self) -> None:
        """Raise if the module left eval mode or a shared frozen parameter changed since the snapshot."""
        check_eval_mode(self.module)
        if self._shared_versions is not None:
            changed = [n for n, t in self.frozen.items() if t._version != self._shared_versions[n]]
            if changed:
                raise RuntimeError(
                    f"the frozen parameter(s) {changed[:5]} of the network were changed in place after "
                    "this linearisation was built with copy_frozen=False; rebuild it (or use the "
                    "default copy_frozen=True)"
                )

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Flat (p,) vector to a name -> tensor dict of the selected parameters."""
        check_tensor(theta, "theta", f"({self.num_params},)")
        if theta.shape != (self.num_params,):
            raise ValueError(
                f"theta must have shape ({self.num_params},) (the selected parameters, flat), got {tuple(theta.shape)}"
            )
        return {n: t.view(s) for n, t, s in zip(self.names, theta.split(self.numels), self.shapes)}

    def _values(self, part: nn.Module, theta: Tensor | None) -> dict[str, Tensor]:
        """The snapshot's tensors that ``part`` (the module or a graph module of its split) holds, by name."""
        values = {**self.frozen, **self.buffers, **({} if theta is None else self.unflatten(theta))}
        if part is self.module:
            return values
        names = [n for n, _ in part.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in part.named_buffers(remove_duplicate=False)]
        return {n: values[n] for n in names if n in values}

    def features(self, x: Tensor) -> Tensor:
        """The frozen prefix's output h for inputs x (n, ...): x itself without a split; computed once per input
        tensor (while it is alive and unchanged) unless x requires grad or is inside a torch.func transform."""
        if self.split is None:
            return x
        if not self._split_checked:
            self._check_split(x)
            if self.split is None:
                return x
        if torch._C._functorch.is_functorch_wrapped_tensor(x) or (x.requires_grad and torch.is_grad_enabled()):
            return functional_call(self.split.prefix, self._values(self.split.prefix, None), (x,))
        cached = self._cached_features(x)
        if cached is not None:
            return cached
        with torch.no_grad():
            h = functional_call(self.split.prefix, self._values(self.split.prefix, None), (x,))
        self._remember(x, h)
        return h

    def take(self, x: Tensor, index: Tensor) -> Tensor:
        """x[index] (rows of x, a new tensor), its frozen-prefix output taken from x's (computed once) rather than
        recomputed: for minibatches gathered from one training set."""
        rows = x[index]
        sharded, group = self._shard_group(x)
        if sharded:
            self.shard(rows, group)
        if self.split is not None and not (x.requires_grad and torch.is_grad_enabled()) and not in_transform():
            features = self.features(x)
            if self.split is not None:  # (the first use checks the split, and may turn it off)
                self._remember(rows, features[index])
        return rows

    def _cached_features(self, x: Tensor) -> Tensor | None:
        """h for x if x is a cached input tensor or a block of its rows (x[a:b], a view of the same memory), at
        the version it had when cached; else None."""
        for key, (ref, version, h) in self._features.items():
            t = ref()
            if t is None or t._version != version or x._version != version or x.shape[1:] != t.shape[1:]:
                continue
            if t is x:
                self._features.move_to_end(key)
                return h
            if x.device != t.device or x.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
                continue
            if x.shape[0] == 0 or t.shape[0] == 0 or x.stride() != t.stride():
                continue
            offset = x.storage_offset() - t.storage_offset()
            row, rest = divmod(offset, t.stride(0)) if t.stride(0) else (0, offset)
            if rest == 0 and 0 <= row and row + x.shape[0] <= t.shape[0]:
                self._features.move_to_end(key)
                return h[row : row + x.shape[0]]
        return None

    def _remember(self, x: Tensor, h: Tensor) -> None:
        """Keep h for x, dropping dead entries and then the least recently used until the budget holds."""
        for key in [k for k, (ref, _, _) in self._features.items() if ref() is None]:
            del self._features[key]
        self._features[id(x)] = (weakref.ref(x), x._version, h)
        while sum(e[2].numel() * e[2].element_size() for e in self._features.values()) > self.feature_cache_bytes:
            self._features.popitem(last=False)

    def _check_split(self, x: Tensor) -> None:
        """Compare the split network with the whole one on x[:2] at θ0; on disagreement warn and do not split. A cut
        whose value is not one tensor with x's rows first (a tuple: ShuffleNet's ``chunk``) is refused and the next
        cut taken (:func:`~ntkgp.frozen_prefix.split_network`)."""
        refused: set[str] = set()
        with torch.no_grad():
            while self.split is not None:
                h = functional_call(self.split.prefix, self._values(self.split.prefix, None), (x[:2],))
                if isinstance(h, Tensor) and h.dim() > 0 and h.shape[0] == x[:2].shape[0]:
                    break
                refused.add(self.split.node)
                self.split = split_network(self.module, self.names, refused)
            if self.split is None:
                self._split_checked = True
                return
            whole = functional_call(self.module, self._values(self.module, self.theta0), (x[:2],))
            parts = functional_call(self.split.suffix, self._values(self.split.suffix, self.theta0), (h,))
        same = isinstance(whole, Tensor) and isinstance(parts, Tensor) and whole.shape == parts.shape
        difference = relative_difference(whole, parts) if same else float("inf")
        if difference > 10 * torch.finfo(self.dtype).eps ** 0.5:
            warnings.warn(
                f"the network split at its frozen prefix ({self.split.cut}) disagrees with the whole network "
                f"(relative difference {difference:.2g}); running the whole network in every product",
                RuntimeWarning,
                stacklevel=3,
            )
            self.split = None
        self._split_checked = True

    def __call__(self, x: Tensor, theta: Tensor | None = None) -> Tensor:
        """Network output (n, C) at ``theta`` (default theta0) for inputs x (n, ...)."""
        self._check_state()
        check_tensor(x, "x", "(n, ...)")
        return self._head(self.features(x), x, theta)

    def _head(self, h: Tensor, x: Tensor, theta: Tensor | None = None) -> Tensor:
        """Output (n, C) for the frozen prefix's output h of inputs x (the rest of the network)."""
        theta = self.theta0 if theta is None else theta
        part = self.module if self.split is None else self.split.suffix
        out = functional_call(part, self._values(part, theta), (h,))
        if not isinstance(out, Tensor) or out.shape[:1] != x.shape[:1]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"the network must map inputs (n, ...) to a tensor (n, ...) ; "
                f"for inputs {tuple(x.shape)} it returned {shape}"
            )
        if not out.is_floating_point():
            raise IntegerOutputsError(
                f"the network returned {out.dtype} outputs: ntkgp linearises floating outputs "
                "(logits, regression values), which an integer output (argmax, labels) has no "
                "derivative of; return the floating outputs"
            )
        return out.reshape(x.shape[0], -1)

    def outputs(self, x: Tensor, name: str = "x") -> Tensor:
        """f(x; θ0) (n, C) without gradient, checked finite."""
        with torch.no_grad():
            out = self(x)
        return check_finite(
            out,
            f"the network's output at {name}",
            f"its inputs reach |{name}| = {float(x.abs().max()):.3g}: rescale or normalise them",
        )

    def num_outputs(self, x: Tensor) -> int:
        """C, the network's output width, from one forward pass on x[:1]; the network's own error, if it fails,
        is raised as a ValueError that gives the input shape."""
        self._check_state()
        try:
            with torch.no_grad():
                return self._head(self.features(x)[:1], x[:1]).shape[-1]
        except IntegerOutputsError:
            raise
        except _NETWORK_ERRORS as err:
            raise ValueError(
                f"the network failed on inputs of shape {tuple(x.shape)} (is that the shape it expects, "
                f"channels included?): {str(err).splitlines()[0]}"
            ) from err

    # --- data parallelism ------------------------------------------------------------------------------------
    def shard(self, x: Tensor, group: Any = None) -> Tensor:
        """Mark x (n_local, ...) as this rank's shard of the training inputs (``ntkgp.distributed``): products
        at x (or at its row blocks and ``take`` minibatches) that sum over inputs are summed over the ranks of
        ``group`` too. Returns x."""
        for key in [k for k, (ref, _) in self._shards.items() if ref() is None]:  # minibatches that are gone
            del self._shards[key]
        self._shards[id(x)] = (weakref.ref(x), group)
        return x

    def _shard_group(self, x: Tensor) -> tuple[bool, Any]:
        """(True, group) if x is a marked shard or views its memory, else (False, None)."""
        for ref, group in self._shards.values():
            t = ref()
            if (
                t is not None
                and t.device == x.device
                and x.numel()
                and (t is x or t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr())
            ):
                return True, group
        return False, None

    def is_sharded(self, x: Tensor) -> bool:
        """Whether x is a marked shard (:meth:`shard`) or views its memory."""
        return self._shard_group(x)[0]

    def sum_over_shards(self, x: Tensor, result: Tensor) -> Tensor:
        """``result`` of a product that sums over the inputs x, summed over the ranks when x is a shard."""
        sharded, group = self._shard_group(x)
        if not sharded:
            return result
        from .distributed import all_reduce_sum

        return all_reduce_sum(result, group)

    # --- cached linearisations ---------------------------------------------------------------------------
    def _saved_tensor_bytes(self, x: Tensor, count: int) -> list[int]:
        """Sizes of the tensors a forward pass over x[:count] saves for its backward (in θ)."""
        sizes: list[int] = []

        def pack(t: Tensor) -> Tensor:
            sizes.append(t.numel() * t.element_size())
            return t

        theta = self.theta0.detach().requires_grad_(True)
        rows = x[:count].detach()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self._head(self.features(rows), rows, theta)
        return sizes

    def _scaled(self, x: Tensor, measure: Callable[[list[int]], int]) -> int:
        """``measure`` of the saved tensors on one and on two inputs, extrapolated linearly to all of x."""
        one, two = measure(self._saved_tensor_bytes(x, 1)), measure(self._saved_tensor_bytes(x, min(2, x.shape[0])))
        per_input = max(two - one, 0)
        return one - per_input + per_input * x.shape[0]

    def saved_activation_bytes(self, x: Tensor) -> int:
        """Estimated memory a linearisation at x (n, ...) holds: the tensors one forward pass saves for its
        backward, measured on one and on two inputs (a part that grows with n, a part that does not), for n,
        twice (the VJP's graph and the linearised JVP's)."""
        return 2 * self._scaled(x, sum)

    def largest_activation_bytes(self, x: Tensor) -> int:
        """The largest tensor a forward pass over x (n, ...) saves, scaled to n as above: what one tangent's JVP
        holds at its peak, about (forward mode frees the others as it goes)."""
        return self._scaled(x, lambda sizes: max(sizes, default=0))

    @contextmanager
    def linearised(self, *inputs: Tensor, budget: builtins.float | None = None) -> Iterator[bool]:
        """Within this context, VJPs and JVPs at these input tensors reuse one forward pass each: torch.func's
        ``vjp_fn`` and ``linearize``'s ``jvp_fn``, built here (outside any autograd Function of
        linear_operator) for inputs whose :meth:`saved_activation_bytes` fit ``budget`` (default half of the
        device's available memory; 0 turns caching off). Yields whether every input was linearised. Meant for
        iterative solvers (CG, Lanczos), whose inputs never change between products."""
        from .memory import default_budget

        budget = default_budget(self.device) if budget is None else budget
        added = []
        try:
            for x in inputs:
                if id(x) in self._linearisations or torch.is_grad_enabled() and x.requires_grad:
                    continue
                need = self.saved_activation_bytes(x)
                if need > budget:
                    continue
                budget -= need
                self._linearisations[id(x)] = (x, *self._linearise(x))
                added.append(id(x))
            yield all(id(x) in self._linearisations for x in inputs)
        finally:
            for key in added:
                self._linearisations.pop(key, None)

    def _linearise(self, x: Tensor) -> tuple[Callable, Callable | None, tuple[int, ...]]:
        """(u -> Jᵀu, v -> J v or None where an op has no forward rule, the output shape (n, C)) from one forward
        pass at x."""
        f = self._f(x)
        out, vjp_fn = _vjp(f, self.theta0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch.fx const folding inside linearize
                _, jvp_fn = linearize(f, self.theta0)
        except (RuntimeError, NotImplementedError) as err:
            if _missing_forward_rule(err) is None:
                raise
            jvp_fn = None
        return vjp_fn, jvp_fn, tuple(out.shape)

    def _cached(self, x: Tensor) -> tuple[Callable, Callable | None, tuple[int, ...]] | None:
        """The linearisation at x, or at a tensor that views the same memory the same way (GPyTorch hands
        kernels reshaped views of its training inputs), at the same version."""
        for t, *functions in self._linearisations.values():
            same = t is x or (
                t.device == x.device
                and t.shape == x.shape
                and t.stride() == x.stride()
                and t.data_ptr() == x.data_ptr()
                and t._version == x._version
            )
            if same:
                return tuple(functions)
        return None

    # --- batched products ----------------------------------------------------------------------------
    def _map(
        self, fn: Callable[[Tensor], Tensor], batch: Tensor, product: str, tol: builtins.float | None = None
    ) -> Tensor:
        """fn over the rows of batch (k, ...), vmapped in chunks.

        One row is a plain call (vmap over a single parameter tangent turns every convolution into a slow
        grouped one). The first batched use of each ``product`` is checked against plain calls on two
        rows (relative tolerance ``tol``, default 10·√eps); if they disagree, that product is computed one
        row at a time from then on, with a warning.
        """
        if batch.shape[0] == 1 or product in self._unbatched:
            return torch.stack([fn(row) for row in batch.unbind(0)])
        try:
            out = vmap(fn, chunk_size=self.chunk_size)(batch)
        except _BATCHING_ERRORS as err:
            first = fn(batch[0])  # the product itself fails too: its own error
            self._unbatchable(product, err)
            return torch.stack([first, *(fn(row) for row in batch[1:].unbind(0))])
        if product in self._verified or in_transform():
            return out
        tol = 10 * torch.finfo(self.dtype).eps ** 0.5 if tol is None else tol
        single = torch.stack([fn(row) for row in batch[:2].unbind(0)])
        difference = relative_difference(out[:2], single)
        if difference <= tol:
            self._verified.add(product)
            return out
        self._disagrees(product, difference)
        return torch.stack([fn(row) for row in batch.unbind(0)])

    def _disagrees(self, product: str, difference: builtins.float) -> None:
        """Record that the batched ``product`` disagreed with one-vector products, and say so."""
        self._unbatched.add(product)
        warnings.warn(
            f"batched (vmap) {product} of this network disagree with one-vector products (relative "
            f"difference {difference:.2g}): an op in it has a wrong batching rule in torch "
            f"{torch.__version__} (torch.cdist is one); computing them one vector at a time from now on "
            "(correct, slower)",
            RuntimeWarning,
            stacklevel=4,
        )

    def _unbatchable(self, product: str, err: Exception) -> None:
        """Record that the batched ``product`` raised where one-vector products work, and say so."""
        self._unbatched.add(product)
        warnings.warn(
            f"batched (vmap) {product} of this network fail in torch {torch.__version__} "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160]}) while one-vector products work: an op "
            "in it has no batching "
            "rule (aten::lstm and GRU are such ops); computing them one vector at a time from now on "
            "(correct, slower)",
            RuntimeWarning,
            stacklevel=4,
        )

    def _f(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        """θ -> f(x; θ) (n, C), the frozen prefix evaluated (or found cached) now, once."""
        self._check_state()
        h = self.features(x)
        return lambda theta: self._head(h, x, theta)

    def _check_vectors(self, vectors: Tensor, name: str, shape: tuple[int, ...], described: str) -> None:
        check_tensor(vectors, name, f"(k, {', '.join(map(str, shape))})")
        if vectors.dim() != len(shape) + 1 or tuple(vectors.shape[1:]) != shape:
            raise ValueError(
                f"{name} must have shape (k, {', '.join(map(str, shape))}) ({described}), got {tuple(vectors.shape)}"
            )
        if vectors.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {vectors.dtype} but the network's parameters are {self.dtype}")

    def vjp(self, x: Tensor, cotangents: Tensor) -> Tensor:
        """Jᵀ U: cotangents (k, n, C) -> (k, p), summed over the ranks when x is a shard (:meth:`shard`)."""
        return self.sum_over_shards(x, self._local_vjp(x, cotangents))

    def _local_vjp(self, x: Tensor, cotangents: Tensor) -> Tensor:
        """Jᵀ U: cotangents (k, n, C) -> (k, p); one forward pass (none within :meth:`linearised`), then k backward
        passes (vmapped)."""
        cached = self._cached(x)
        if cached is None:
            out, vjp_fn = _vjp(self._f(x), self.theta0)
            shape = tuple(out.shape)
        else:
            vjp_fn, _, shape = cached
        self._check_vectors(cotangents, "cotangents", shape, "one (n, C) output-space vector each")
        if cotangents.shape[0] == 0:
            return cotangents.new_zeros(0, self.num_params)
        result = self._map(lambda u: vjp_fn(u)[0], cotangents, "vector-Jacobian products")
        return check_finite(result, "the vector-Jacobian product J(x)ᵀu", _OVERFLOW_HINT)

    def jvp(self, x: Tensor, tangents: Tensor) -> Tensor:
        """J V: tangents (k, p) -> (k, n, C), forward mode; double-VJP where an op has no forward rule."""
        self._check_vectors(tangents, "tangents", (self.num_params,), "one parameter-space vector each")
        if tangents.shape[0] == 0:
            return tangents.new_zeros(0, x.shape[0], self.num_outputs(x))
        cached = self._cached(x)
        if cached is not None and cached[1] is not None:
            result = self._map(cached[1], tangents, "Jacobian-vector products")
            return check_finite(result, "the Jacobian-vector product J(x)v", _OVERFLOW_HINT)
        if not self.use_double_vjp:
            f = self._f(x)
            try:
                result = self._map(lambda v: jvp(f, (self.theta0,), (v,))[1], tangents, "Jacobian-vector products")
                return check_finite(result, "the Jacobian-vector product J(x)v", _OVERFLOW_HINT)
            except (RuntimeError, NotImplementedError) as err:
                op = _missing_forward_rule(err)
                if op is None:
                    raise
                self._check_double_vjp(x, op)
                self.use_double_vjp = True
        return check_finite(self._jvp_double_vjp(x, tangents), "the Jacobian-vector product J(x)v", _OVERFLOW_HINT)

    def linearised_outputs(self, x: Tensor, delta: Tensor) -> Tensor:
        """f(x; θ0) + J(x; θ0) δ (n, C) for δ (p,): the first-order Taylor expansion at θ0, in one forward-mode pass
        (the primal and the tangent of one JVP); two passes where an op has no forward rule."""
        self._check_vectors(delta.unsqueeze(0), "delta", (self.num_params,), "a parameter-space vector")
        if not self.use_double_vjp:
            try:
                out, tangent = jvp(self._f(x), (self.theta0,), (delta,))[:2]
                return check_finite(out + tangent, "the linearised outputs f(x) + J(x)δ", _OVERFLOW_HINT)
            except (RuntimeError, NotImplementedError) as err:
                if _missing_forward_rule(err) is None:
                    raise
        return check_finite(
            self.outputs(x) + self.jvp(x, delta.unsqueeze(0))[0], "the linearised outputs f(x) + J(x)δ", _OVERFLOW_HINT
        )

    def _jvp_double_vjp(self, x: Tensor, tangents: Tensor) -> Tensor:
        """J V as the VJP of the linear map u -> Jᵀ u (two reverse passes)."""
        out, vjp_fn = _vjp(self._f(x), self.theta0)
        _, vjp_of_vjp = _vjp(lambda u: vjp_fn(u)[0], torch.zeros_like(out))
        return self._map(lambda v: vjp_of_vjp(v)[0], tangents, "double-VJP Jacobian-vector products")

    def _check_double_vjp(self, x: Tensor, op: str) -> None:
        """Adjoint test uᵀ(J v) = (Jᵀu)ᵀ v of the double-VJP; raise naming ``op`` if it fails or is wrong."""
        generator = torch.Generator(device=self.device).manual_seed(0)
        v = torch.randn(1, self.num_params, generator=generator, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            out = self(x)
        u = torch.randn(1, *out.shape, generator=generator, dtype=self.dtype, device=self.device)
        try:
            lhs = (u * self._jvp_double_vjp(x, v)).sum()
            problem = None
        except (RuntimeError, NotImplementedError) as err:
            problem = str(err).splitlines()[0]
        if problem is None:
            rhs = (self._local_vjp(x, u) * v).sum()
            tol = torch.finfo(self.dtype).eps ** 0.5 * max(1.0, float(rhs.abs()))
            if not float((lhs - rhs).abs()) <= tol:
                problem = f"it is wrong for this network (adjoint test: {float(lhs):.6g} vs {float(rhs):.6g})"
        if problem is not None:
            raise NotImplementedError(
                f"the network uses {op}, which has no forward-mode (JVP) rule in torch {torch.__version__}, "
                f"and the double-VJP fallback cannot replace it: {problem}. Replace that op, or linearise "
                "only parameters that it does not depend on"
            )

    def output_gradients(self, x: Tensor, loss: Callable[[Tensor], Tensor], thetas: Tensor) -> Tensor:
        """∇θ loss(f(x; θ)) at each row of thetas (k, p) -> (k, p); a forward and a backward pass each.

        One row is plain autograd unless called inside a torch.func transform (which refuses
        ``requires_grad_``): torch.func.grad's transform held 110 MiB more at its peak for ResNet-18 at
        n = 256 on the CPU (350 against 239 MiB above the baseline) and took about 4 % longer. The
        batched path is checked as in ``_map`` with a tolerance that allows for the rounding of
        differences of nearby θ, eps·(1 + ‖θ0‖)/min‖θ − θ0‖.
        """
        self._check_vectors(thetas, "thetas", (self.num_params,), "one parameter vector each")
        if thetas.shape[0] == 1:
            create_graph = torch.is_grad_enabled() and x.requires_grad
            try:
                theta = thetas[0].detach().requires_grad_(True)
            except RuntimeError:  # inside a torch.func transform: torch.func.grad below
                pass
            else:
                with torch.enable_grad():
                    (grad,) = torch.autograd.grad(loss(self._f(x)(theta)), theta, create_graph=create_graph)
                return check_finite(
                    self.sum_over_shards(x, grad.unsqueeze(0)), "the gradient ∇θ loss(f(x; θ))", _OVERFLOW_HINT
                )
        tol = None
        if not in_transform():
            eps, step = torch.finfo(self.dtype).eps, float((thetas - self.theta0).norm(dim=-1).min())
            tol = 10 * (eps**0.5 + eps * (1 + float(self.theta0.norm())) / max(step, eps))
        f = self._f(x)
        grads = self._map(torch.func.grad(lambda theta: loss(f(theta))), thetas, "loss gradients", tol)
        grads = self.sum_over_shards(x, grads)
        return check_finite(grads, "the gradient ∇θ loss(f(x; θ))", _OVERFLOW_HINT)

    def jacobian_chunks(self, x: Tensor) -> Iterator[Tensor]:
        """Per-sample Jacobians (b, C, p) of consecutive chunks of x; b·C·p <= jacobian_chunk_elements.

        The first chunk is checked against one VJP (uᵀJ for a random u); if the batched Jacobian disagrees,
        the rows come from VJPs of unit cotangents instead, with a warning.
        """
        num_outputs = self.num_outputs(x)
        b = max(1, self.jacobian_chunk_elements // (num_outputs * self.num_params))
        per_sample = vmap(
            jacrev(lambda theta, hi, xi: self._head(hi.unsqueeze(0), xi.unsqueeze(0), theta)[0]), in_dims=(None, 0, 0)
        )
        features = self.features(x)
        for start in range(0, x.shape[0], b):
            whole = b >= x.shape[0]  # x itself, whose prefix output is cached, rather than a new view
            chunk, chunk_features = (x, features) if whole else (x[start : start + b], features[start : start + b])
            if "per-sample Jacobians" in self._unbatched:
                yield self._jacobian_rows(chunk, num_outputs)
                continue
            try:
                jac = per_sample(self.theta0, chunk_features, chunk)
            except _BATCHING_ERRORS as err:  # no batching rule over inputs (aten::lstm): rows from VJPs
                rows = self._jacobian_rows(chunk, num_outputs)  # the product itself fails too: its own error
                self._unbatchable("per-sample Jacobians", err)
                yield rows
                continue
            if "per-sample Jacobians" not in self._verified and not in_transform():
                jac = self._check_jacobian(chunk, jac)
            yield check_finite(jac, "the per-sample Jacobian J(x)", _OVERFLOW_HINT)

    def _jacobian_rows(self, x: Tensor, num_outputs: int) -> Tensor:
        """Per-sample Jacobians (b, C, p) from VJPs of the b·C unit cotangents."""
        size = x.shape[0] * num_outputs
        eye = torch.eye(size, dtype=self.dtype, device=self.device).reshape(size, x.shape[0], num_outputs)
        return map_blocks(lambda u: self._local_vjp(x, u), eye, self.chunk_size).reshape(x.shape[0], num_outputs, -1)

    def _check_jacobian(self, x: Tensor, jac: Tensor) -> Tensor:
        """``jac`` if uᵀJ agrees with a one-vector VJP (10·√eps), else the rows from VJPs (and a warning)."""
        generator = torch.Generator(device=self.device).manual_seed(0)
        u = torch.randn(1, *jac.shape[:2], generator=generator, dtype=self.dtype, device=self.device)
        difference = relative_difference(torch.einsum("bc,bcp->p", u[0], jac), self._local_vjp(x, u)[0])
        if difference <= 10 * torch.finfo(self.dtype).eps ** 0.5:
            self._verified.add("per-sample Jacobians")
            return jac
        self._disagrees("per-sample Jacobians", difference)
        return self._jacobian_rows(x, jac.shape[1])


_OVERFLOW_HINT = (
    "the network's outputs or derivatives overflow at these inputs or weights: rescale or normalise "
    "the inputs, or check the weights"
)


def as_functional_network(
    model: nn.Module | FunctionalNetwork, params: Sequence[str] | str | None = None, chunk_size: int | None = None
) -> FunctionalNetwork:
    """``model`` itself if it is a :class:`FunctionalNetwork`, else a snapshot of the module.

    ``params`` and ``chunk_size`` belong to the snapshot: with a FunctionalNetwork they must be left
    None (it has its own), not silently ignored.
    """
    if isinstance(model, FunctionalNetwork):
        given = [name for name, value in (("params", params), ("chunk_size", chunk_size)) if value is not None]
        if given:
            raise ValueError(
                f"{' and '.join(given)} cannot be combined with a FunctionalNetwork, which has its own "
                f"(params {model.names[:3]}{'...' if len(model.names) > 3 else ''}, chunk_size "
                f"{model.chunk_size}); pass the nn.Module instead, or build the FunctionalNetwork "
                "with them"
            )
        return model
    return FunctionalNetwork(model, params, 32 if chunk_size is None else chunk_size)


def map_blocks(fn: Callable[[Tensor], Tensor], vectors: Tensor, block: int) -> Tensor:
    """Apply ``fn`` to row blocks of ``vectors`` (k, ...) and concatenate: bounds peak memory to one block."""
    if vectors.shape[0] <= block:
        return fn(vectors)
    return torch.cat([fn(vectors[s : s + block]) for s in range(0, vectors.shape[0], block)])
