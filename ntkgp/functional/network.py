"""The functional layer: a network as a pure function of a flat parameter vector, and its Jacobian products.

Everything above this package (operators, GP models, posteriors) reaches the network's Jacobian only through
:class:`FunctionalNetwork`: ``jvp`` (J V, forward mode), ``vjp`` (Jᵀ U, reverse mode) and ``jacobian_chunks``
(per-sample Jacobians of a few inputs at a time, for diagonals and rows). It is assembled from parts, one idea each:

- :mod:`.snapshot` — the module's tensors (θ0, frozen weights, buffers) and their conversions;
- :mod:`.prefix_cache` (with :mod:`.frozen_prefix`) — the frozen prefix, run once per input tensor;
- :mod:`.function` (with :mod:`.network_output`, :mod:`.attention`) — f(x; θ) (n, C) for any inputs;
- :mod:`.linearisation_cache` — one forward pass reused by iterative solvers;
- :mod:`.shards` — products summed over the ranks of a process group;
- :mod:`.checked_batching` — vmapped products checked once against one-at-a-time products;
- this module — the products themselves, built on those parts.

Shapes: n inputs (:mod:`ntkgp.inputs`: a tensor, a tuple of tensors or a mapping), C outputs per input, p selected
parameters, k tangent/cotangent vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import jacrev, jvp, vmap

from ..inputs import Inputs, inputs_at, length, map_leaves, requires_grad
from ..validation import as_count, check_finite, check_tensor, in_transform
from .checked_batching import BATCHING_ERRORS, map_blocks, relative_difference
from .forward_rules import calling_module, missing_forward_rule, vjp_of
from .linearisation_cache import LinearisationCache
from .network_output import OutputSelector, select_output
from .shards import Shards

__all__ = ["FunctionalNetwork", "as_functional_network"]


def _one(x: Inputs) -> Inputs:
    """One input (vmap's view, without the input dimension) as a batch of one."""
    return map_leaves(lambda t: t.unsqueeze(0), x)


class FunctionalNetwork(LinearisationCache, Shards):
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

    Inputs x are a tensor (n, ...) — floating, or integer token ids — a tuple of tensors (``model(*x)``) or a
    mapping such as a HuggingFace ``BatchEncoding`` (``model(**x)``); see :mod:`ntkgp.inputs`. f is what the network
    returns, or its ``logits`` (a HuggingFace ``ModelOutput``), or ``output(returned)``; flattened to (n, C).
    Attention runs on the math scaled-dot-product backend with ``nn.MultiheadAttention``'s fast path off inside
    every call (:mod:`~ntkgp.functional.attention`); the caller's settings are restored after.

    Batched products (``vmap`` over vectors or inputs) are checked against one-at-a-time products at their first
    use (some ops have wrong batching rules: ``torch.cdist``'s backward on torch 2.13/2.14); a disagreement, or a
    batched path that raises (no batching rule: ``aten::lstm``; Python branches on input values: HuggingFace's
    attention masks), warns once and switches that product to one at a time.

    The frozen prefix — the largest first part of the network that depends on no selected parameter
    (:mod:`~ntkgp.functional.frozen_prefix`) — is evaluated once per input tensor and its output h kept (up to
    ``feature_cache_bytes``, least recently used first out); every product then runs through the rest only.
    The split is checked against the whole network on the first inputs; ``split`` says where it cut (None:
    no split). Inputs that require grad are never cached (gradients in x flow through the prefix).

    Args:
        module: the network; its f for n inputs is (n,) or (n, C, ...) (flattened to C).
        params: parameter names or module prefixes, see :func:`select_parameters`.
        chunk_size: tangents/cotangents pushed through the network at once (bounds memory).
        jacobian_chunk_elements: bound on b·C·p for per-sample Jacobian chunks.
        copy_frozen: copy the non-selected parameters (default) or share them with the module.
        frozen_prefix: find and cache the frozen prefix (default True); False runs the whole network always.
        feature_cache_bytes: memory for the prefix outputs of recent input tensors (default 1 GiB).
        output: a function from what the network returns to f (a tensor (n, ...)); default: the returned tensor, or
            its ``logits`` (HuggingFace ``ModelOutput``). E.g. ``output=lambda out: out[0][:, -1]`` for the last
            step of an LSTM's outputs.
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
        output: OutputSelector | None = None,
    ):
        super().__init__(module, params, copy_frozen)
        self.chunk_size = as_count(chunk_size, "chunk_size")
        self.jacobian_chunk_elements = as_count(jacobian_chunk_elements, "jacobian_chunk_elements")
        if output is not None and not callable(output):
            raise TypeError(
                f"output must be a function from what the network returns to f (a tensor), got {type(output).__name__}"
            )
        self.output = output
        self._init_prefix(frozen_prefix, feature_cache_bytes)
        self._reset_checks()

    def _reset_checks(self) -> None:
        """Forget what was learnt about the products (after a conversion: other kernels may run)."""
        super()._reset_checks()
        self.use_double_vjp = False
        #: shortcut name -> whether it agreed with the plain products when first checked (the layer-factor kernel)
        self.shortcut_checks: dict[str, bool] = {}

    def at(self, theta: Tensor) -> FunctionalNetwork:
        """The same network linearised at ``theta`` (p,) instead of θ0 (a copy of it): frozen parameters, buffers,
        the split and the cache of prefix outputs are shared (the prefix depends on no selected parameter),
        linearisations at inputs are not. Re-linearising costs no copy of the module."""
        moved: FunctionalNetwork = self._at(theta)
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
            self.module_copy(),
            list(names),
            self.chunk_size,
            self.jacobian_chunk_elements,
            frozen_prefix=False,
            output=self.output,
        )
        sub.split, sub._split_checked, sub._features = self.split, self._split_checked, self._features
        sub._unbatched = self._unbatched  # an op without a (right) batching rule lacks it in every subset
        return sub

    def take(self, x: Inputs, index: Tensor) -> Inputs:
        """The inputs x[index] (new tensors), their frozen-prefix output taken from x's (computed once) rather than
        recomputed: for minibatches gathered from one training set."""
        picked = inputs_at(x, index)
        sharded, group = self._shard_group(x)
        if sharded:
            self.shard(picked, group)
        if isinstance(x, Tensor) and isinstance(picked, Tensor) and not requires_grad(x) and not in_transform():
            if self.splits(x):  # (the first use checks the split, and may turn it off)
                features = self.features(x)
                assert isinstance(features, Tensor)
                self._remember(picked, features[index])
        return picked

    # --- the products --------------------------------------------------------------------------------
    def _check_vectors(self, vectors: Tensor, name: str, shape: tuple[int, ...], described: str) -> None:
        check_tensor(vectors, name, f"(k, {', '.join(map(str, shape))})")
        if vectors.dim() != len(shape) + 1 or tuple(vectors.shape[1:]) != shape:
            raise ValueError(
                f"{name} must have shape (k, {', '.join(map(str, shape))}) ({described}), got {tuple(vectors.shape)}"
            )
        if vectors.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {vectors.dtype} but the network's parameters are {self.dtype}")

    def vjp(self, x: Inputs, cotangents: Tensor) -> Tensor:
        """Jᵀ U: cotangents (k, n, C) -> (k, p), summed over the ranks when x is a shard (:meth:`shard`)."""
        return self.sum_over_shards(x, self._local_vjp(x, cotangents))

    def _local_vjp(self, x: Inputs, cotangents: Tensor) -> Tensor:
        """Jᵀ U: cotangents (k, n, C) -> (k, p); one forward pass (none within :meth:`linearised`), then k backward
        passes (vmapped)."""
        cached = self._cached(x)
        if cached is None:
            out, vjp_fn = vjp_of(self._f(x), self.theta0)
            shape = tuple(out.shape)
        else:
            vjp_fn, _, shape = cached
        self._check_vectors(cotangents, "cotangents", shape, "one (n, C) output-space vector each")
        if cotangents.shape[0] == 0:
            return cotangents.new_zeros(0, self.num_params)
        result = self._map(lambda u: vjp_fn(u)[0], cotangents, "vector-Jacobian products")
        return check_finite(result, "the vector-Jacobian product J(x)ᵀu", _OVERFLOW_HINT)

    def jvp(self, x: Inputs, tangents: Tensor) -> Tensor:
        """J V: tangents (k, p) -> (k, n, C), forward mode; double-VJP where an op has no forward rule."""
        self._check_vectors(tangents, "tangents", (self.num_params,), "one parameter-space vector each")
        if tangents.shape[0] == 0:
            return tangents.new_zeros(0, length(x), self.num_outputs(x))
        tangents = self._without_constants(tangents)
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
                op = missing_forward_rule(err)
                if op is None:
                    raise
                self._check_double_vjp(x, op)
                self.use_double_vjp = True
        return check_finite(self._jvp_double_vjp(x, tangents), "the Jacobian-vector product J(x)v", _OVERFLOW_HINT)

    def linearised_outputs(self, x: Inputs, delta: Tensor) -> Tensor:
        """f(x; θ0) + J(x; θ0) δ (n, C) for δ (p,): the first-order Taylor expansion at θ0, in one forward-mode pass
        (the primal and the tangent of one JVP); two passes where an op has no forward rule."""
        self._check_vectors(delta.unsqueeze(0), "delta", (self.num_params,), "a parameter-space vector")
        delta = self._without_constants(delta.unsqueeze(0))[0]
        if not self.use_double_vjp:
            try:
                out, tangent = jvp(self._f(x), (self.theta0,), (delta,))[:2]
                return check_finite(out + tangent, "the linearised outputs f(x) + J(x)δ", _OVERFLOW_HINT)
            except (RuntimeError, NotImplementedError) as err:
                if missing_forward_rule(err) is None:
                    raise
        return check_finite(
            self.outputs(x) + self.jvp(x, delta.unsqueeze(0))[0], "the linearised outputs f(x) + J(x)δ", _OVERFLOW_HINT
        )

    def _jvp_double_vjp(self, x: Inputs, tangents: Tensor) -> Tensor:
        """J V as the VJP of the linear map u -> Jᵀ u (two reverse passes)."""
        out, vjp_fn = vjp_of(self._f(x), self.theta0)
        _, vjp_of_vjp = vjp_of(lambda u: vjp_fn(u)[0], torch.zeros_like(out))
        return self._map(lambda v: vjp_of_vjp(v)[0], tangents, "double-VJP Jacobian-vector products")

    def _check_double_vjp(self, x: Inputs, op: str) -> None:
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
            first = inputs_at(x, slice(0, 1))
            where = calling_module(
                self.module,
                lambda: jvp(
                    lambda th: select_output(self._run(self.module, th, first), self.output), (self.theta0,), (v[0],)
                ),
            )
            attention = (
                " (attention modules should call F.scaled_dot_product_attention or nn.MultiheadAttention, which ntkgp "
                "runs on the math backend)"
                if "attention" in op.lower()
                else ""
            )
            raise NotImplementedError(
                f"the network uses {op}{f', called by the module {where},' if where else ''} which has no forward-mode "
                f"(JVP) rule in torch {torch.__version__}, and the double-VJP fallback cannot replace it: "
                f"{problem.rstrip('.')}. Replace that op or module{attention}, or linearise only parameters that it "
                "does not depend on"
            )

    def output_gradients(self, x: Inputs, loss: Callable[[Tensor], Tensor], thetas: Tensor) -> Tensor:
        """∇θ loss(f(x; θ)) at each row of thetas (k, p) -> (k, p); a forward and a backward pass each.

        One row is plain autograd unless called inside a torch.func transform (which refuses
        ``requires_grad_``): torch.func.grad's transform held 110 MiB more at its peak for ResNet-18 at
        n = 256 on the CPU (350 against 239 MiB above the baseline) and took about 4 % longer. The
        batched path is checked as in ``_map`` with a tolerance that allows for the rounding of
        differences of nearby θ, eps·(1 + ‖θ0‖)/min‖θ − θ0‖.
        """
        self._check_vectors(thetas, "thetas", (self.num_params,), "one parameter vector each")
        if thetas.shape[0] == 1:
            create_graph = requires_grad(x)
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

    def jacobian_chunks(self, x: Inputs) -> Iterator[Tensor]:
        """Per-sample Jacobians (b, C, p) of consecutive chunks of x; b·C·p <= jacobian_chunk_elements.

        The first chunk is checked against one VJP (uᵀJ for a random u); if the batched Jacobian disagrees,
        the rows come from VJPs of unit cotangents instead, with a warning.
        """
        num_outputs = self.num_outputs(x)
        b = max(1, self.jacobian_chunk_elements // (num_outputs * self.num_params))
        per_sample = vmap(jacrev(lambda theta, hi, xi: self._head(_one(hi), _one(xi), theta)[0]), in_dims=(None, 0, 0))
        features = self.features(x)
        n = length(x)
        for start in range(0, n, b):
            whole = b >= n  # x itself, whose prefix output is cached, rather than a new view
            block = slice(start, start + b)
            chunk, chunk_features = (x, features) if whole else (inputs_at(x, block), inputs_at(features, block))
            if "per-sample Jacobians" in self._unbatched:
                yield self._jacobian_rows(chunk, num_outputs)
                continue
            try:
                jac = per_sample(self.theta0, chunk_features, chunk)
            except BATCHING_ERRORS as err:  # no batching rule over inputs (aten::lstm), branches on values: VJPs
                jac = self._jacobian_rows(chunk, num_outputs)  # the product itself fails too: its own error
                self._unbatchable("per-sample Jacobians", err)
                yield jac
                continue
            if "per-sample Jacobians" not in self._verified and not in_transform():
                jac = self._check_jacobian(chunk, jac)
            yield check_finite(jac, "the per-sample Jacobian J(x)", _OVERFLOW_HINT)

    def _jacobian_rows(self, x: Inputs, num_outputs: int) -> Tensor:
        """Per-sample Jacobians (b, C, p) from VJPs of the b·C unit cotangents."""
        n = length(x)
        size = n * num_outputs
        eye = torch.eye(size, dtype=self.dtype, device=self.device).reshape(size, n, num_outputs)
        return map_blocks(lambda u: self._local_vjp(x, u), eye, self.chunk_size).reshape(n, num_outputs, -1)

    def _check_jacobian(self, x: Inputs, jac: Tensor) -> Tensor:
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
