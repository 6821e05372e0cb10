"""A batch of network inputs, as users hold them: everything else in ntkgp reads inputs through this module.

A batch of n inputs is one of

- a tensor (n, ...): floating features, or integer token ids (passed to the network untouched), called as
  ``model(x)``;
- a tuple or list of tensors that share their first dimension n, called as ``model(*x)`` (``model(img, meta)``);
- a mapping of names to such tensors — a ``dict`` or HuggingFace's ``BatchEncoding`` (a ``UserDict``) — called as
  ``model(**x)``; tensors of any dtype ride along (attention masks, position ids).

Its floating tensors are the network's inputs in its dtype; its integer and boolean tensors keep their dtype through
every conversion. A batch's :class:`Structure` (its kind, names and each tensor's per-input shape and dtype) is what
later inputs are checked against: test inputs must have the training inputs' structure.

Shapes: n inputs; a leaf is one tensor of the batch, (n, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Inputs",
    "Layout",
    "Structure",
    "Unpack",
    "call_arguments",
    "cat",
    "check_inputs",
    "chunks",
    "convert",
    "describe",
    "gather",
    "layout",
    "leaves",
    "length",
    "magnitude",
    "inputs_at",
    "map_leaves",
    "loader_pair",
    "pack",
    "requires_grad",
    "same",
    "structure",
]

#: one tensor (n, ...), a tuple/list of tensors (n, ...), or a mapping name -> tensor (n, ...)
Inputs = Tensor | Sequence[Tensor] | Mapping[str, Tensor]


def _kind(x: Any) -> str:
    if isinstance(x, Tensor):
        return "tensor"
    if isinstance(x, (tuple, list)):
        return "tuple"
    if isinstance(x, Mapping):
        return "mapping"
    return "other"


def _names(x: Inputs) -> tuple[str, ...]:
    """The leaves' names: () for a tensor, positions for a tuple, keys for a mapping."""
    if isinstance(x, Tensor):
        return ()
    if isinstance(x, Mapping):
        return tuple(x.keys())
    return tuple(str(i) for i in range(len(x)))


def leaves(x: Inputs) -> list[Tensor]:
    """The batch's tensors, in order (one for a tensor)."""
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, Mapping):
        return list(x.values())
    return list(x)


def _rebuild(x: Inputs, new: Sequence[Tensor]) -> Inputs:
    """A batch of x's kind and names holding the tensors ``new`` (a mapping becomes a plain dict)."""
    if isinstance(x, Tensor):
        return new[0]
    if isinstance(x, Mapping):
        return dict(zip(x.keys(), new))
    return tuple(new)


@dataclass(frozen=True)
class Layout:
    """How a batch's tensors are held (kind and names), without the tensors: ``layout(x).build(leaves(x))`` is x.
    For containers whose arguments must be tensors (linear_operator's representation)."""

    kind: str
    names: tuple[str, ...]

    @property
    def size(self) -> int:
        """How many tensors a batch of this layout holds."""
        return 1 if self.kind == "tensor" else len(self.names)

    def build(self, tensors: Sequence[Tensor]) -> Inputs:
        """The batch of this layout holding ``tensors``."""
        if self.kind == "tensor":
            return tensors[0]
        if self.kind == "mapping":
            return dict(zip(self.names, tensors))
        return tuple(tensors)


def layout(x: Inputs) -> Layout:
    """x's layout (a mapping's keys in order)."""
    return Layout(_kind(x), _names(x))


def map_leaves(fn: Callable[[Tensor], Tensor], x: Inputs) -> Inputs:
    """The batch with ``fn`` applied to each tensor."""
    return _rebuild(x, [fn(t) for t in leaves(x)])


def length(x: Inputs) -> int:
    """n, the number of inputs (the first dimension every tensor shares)."""
    return leaves(x)[0].shape[0]


def inputs_at(x: Inputs, index: slice | Tensor) -> Inputs:
    """The inputs at ``index`` (a slice: views; a long tensor of positions: copies)."""
    return map_leaves(lambda t: t[index], x)


def chunks(x: Inputs, size: int) -> Iterator[Inputs]:
    """Consecutive blocks of at most ``size`` inputs (x itself when it has no more)."""
    n = length(x)
    if n <= size:
        yield x
        return
    for start in range(0, n, size):
        yield inputs_at(x, slice(start, start + size))


def cat(batches: Sequence[Inputs]) -> Inputs:
    """The inputs of several batches of one structure, concatenated."""
    parts = [leaves(b) for b in batches]
    return _rebuild(batches[0], [torch.cat(column) for column in zip(*parts)])


def convert(x: Inputs, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Inputs:
    """x on ``device`` with its floating tensors in ``dtype``; integer and boolean tensors keep their dtype."""
    return map_leaves(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None), x)


def requires_grad(x: Inputs) -> bool:
    """Whether a tensor of x requires grad (with grad mode on: gradients in x are wanted)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in leaves(x))


def magnitude(x: Inputs) -> float:
    """The largest |value| among x's floating tensors (0 when it has none): for messages about overflow."""
    values = [float(t.detach().abs().max()) for t in leaves(x) if t.is_floating_point() and t.numel()]
    return max(values, default=0.0)


def same(a: Inputs, b: Inputs) -> bool:
    """Whether b is a, or holds views of a's tensors with the same shapes, strides and versions (GPyTorch hands
    kernels reshaped views of its training inputs)."""
    if a is b:
        return True
    la, lb = leaves(a), leaves(b)
    if _kind(a) != _kind(b) or _names(a) != _names(b) or len(la) != len(lb):
        return False
    return all(
        s is t
        or (
            s.device == t.device
            and s.shape == t.shape
            and s.stride() == t.stride()
            and s.dtype == t.dtype
            and s.data_ptr() == t.data_ptr()
            and s._version == t._version
        )
        for s, t in zip(la, lb)
    )


def call_arguments(x: Inputs) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """(args, kwargs) the network is called with: ``model(x)``, ``model(*x)`` or ``model(**x)``."""
    if isinstance(x, Tensor):
        return (x,), {}
    if isinstance(x, Mapping):
        return (), dict(x)
    return tuple(x), {}


def describe(x: Any) -> str:
    """A short description for messages: "tensor (8, 3, 32, 32) float32", "dict {input_ids: (8, 16) int64, …}"."""
    if isinstance(x, Tensor):
        return f"tensor {tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    if _kind(x) == "other":
        return type(x).__name__
    parts = [
        f"{name}: "
        + (f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" if isinstance(t, Tensor) else type(t).__name__)
        for name, t in zip(_names(x), x.values() if isinstance(x, Mapping) else x)
    ]
    return f"{type(x).__name__} {{{', '.join(parts)}}}"


@dataclass(frozen=True)
class Structure:
    """What inputs of one batch have in common with another: kind, names, each tensor's per-input shape and
    dtype kind (floating, or its own integer/bool dtype)."""

    kind: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    def __str__(self) -> str:
        per = [f"(n, {', '.join(map(str, s))}) {d}" if s else f"(n,) {d}" for s, d in zip(self.shapes, self.dtypes)]
        if self.kind == "tensor":
            return f"a tensor {per[0]}"
        return f"a {self.kind} {{{', '.join(f'{k}: {p}' for k, p in zip(self.names, per))}}}"

    def check(self, x: Inputs, name: str, of: str = "the training inputs") -> None:
        """Raise a ValueError naming ``name`` unless x (already checked by :func:`check_inputs`) has this
        structure, that of ``of``."""
        found = structure(x)
        if found == self:
            return
        if (found.kind, found.names, found.shapes) == (self.kind, self.names, self.shapes):
            raise TypeError(
                f"{name} has dtype {_dtypes(found)} where {of} have {_dtypes(self)}: convert them alike (floating "
                "features in the network's dtype, token ids as integers)"
            )
        if found.kind == self.kind == "tensor" and found.dtypes == self.dtypes:
            raise ValueError(
                f"{name} has per-input shape {found.shapes[0]}, but {self.shapes[0]} is expected (that of {of}); "
                f"pass inputs (n, {', '.join(map(str, self.shapes[0]))})"
            )
        if found != self:
            raise ValueError(
                f"{name} is {found} but {self} is expected (that of {of}): give the inputs the same "
                "kind, names, per-input shapes and dtypes (pad token ids to the same length)"
            )


def _dtypes(s: Structure) -> str:
    return ", ".join(d if d == "floating" else f"torch.{d}" for d in s.dtypes)


def _dtype_kind(t: Tensor) -> str:
    return "floating" if t.is_floating_point() else str(t.dtype).replace("torch.", "")


def structure(x: Inputs) -> Structure:
    """The structure of a checked batch x."""
    ls = leaves(x)
    return Structure(_kind(x), _names(x), tuple(tuple(t.shape[1:]) for t in ls), tuple(_dtype_kind(t) for t in ls))


def _expected(name: str) -> str:
    return (
        f"{name} must be a torch.Tensor (n, ...), a tuple/list of tensors (n, ...) (the network is called as "
        f"model(*{name})) or a mapping of names to tensors (n, ...) such as a dict or a HuggingFace BatchEncoding "
        f"(called as model(**{name}))"
    )


def check_inputs(
    x: Any,
    dtype: torch.dtype,
    name: str = "x",
    device: torch.device | None = None,
    like: Structure | None = None,
    of: str = "the training inputs",
) -> Inputs:
    """Raise unless ``x`` is a batch of n >= 1 inputs whose tensors share n, whose floating tensors are finite and
    in ``dtype``, on ``device`` when given, with the structure ``like`` (that of ``of``) when given; return it, a
    mapping as a plain dict.

    Integer and boolean tensors (token ids, masks) are passed to the network as they are; complex ones are refused.
    """
    kind = _kind(x)
    if kind == "other":
        raise TypeError(
            f"{_expected(name)}; got {type(x).__name__}: convert it with torch.as_tensor({name}, dtype=...)"
        )
    if kind == "mapping":
        x = dict(x)
        if not x or not all(isinstance(k, str) for k in x):
            raise TypeError(f"{name} must map argument names (strings) to tensors; got keys {list(x)[:5]}")
    if kind != "tensor" and not leaves(x):
        raise ValueError(f"{name} is an empty {type(x).__name__}; {_expected(name)}")
    for key, t in zip(_names(x) or ("",), leaves(x)):
        where = f"{name}[{key!r}]" if kind == "mapping" else f"{name}[{key}]" if kind == "tuple" else name
        if not isinstance(t, Tensor):
            raise TypeError(f"{where} is a {type(t).__name__}, not a tensor; {_expected(name)}")
        if t.is_complex():
            raise TypeError(f"{where} has dtype {t.dtype}; complex inputs are not supported")
        if t.is_floating_point() and t.dtype != dtype:
            raise TypeError(
                f"{where} has dtype {t.dtype} but the network's parameters are {dtype}: convert with "
                f"{where}.to({dtype}) or the network with .to({t.dtype}) (integer token ids stay integer)"
            )
        if device is not None and t.device != torch.device(device):
            raise ValueError(
                f"{where} is on {t.device} but the network is on {device}: move it with "
                f"ntkgp.inputs.convert({name}, '{device}') or {where}.to('{device}')"
            )
        if t.dim() == 0 or t.shape[0] == 0:
            raise ValueError(f"{where} must have shape (n, ...) with n >= 1, got {tuple(t.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where} contains NaN or Inf values; remove or impute them first")
    sizes = {t.shape[0] for t in leaves(x)}
    if len(sizes) > 1:
        raise ValueError(f"the tensors of {name} must share their first dimension n (the inputs), got {describe(x)}")
    if like is not None:
        like.check(x, name, of)
    return x


def pack(x: Inputs, dtype: torch.dtype) -> Tensor:
    """x as one floating matrix (n, D) of ``dtype``, every tensor flattened per input and concatenated (integer ids
    carried exactly as floats): for GPyTorch, which takes (n, d) float inputs; :class:`Unpack` inverts it."""
    if isinstance(x, Tensor) and x.is_floating_point():
        return x.reshape(x.shape[0], -1).to(dtype)
    exact = 2.0 / torch.finfo(dtype).eps  # integers up to this are exact in dtype
    columns = []
    for t in leaves(x):
        if not t.is_floating_point() and t.dtype != torch.bool and t.numel() and float(t.abs().max()) > exact:
            raise ValueError(
                f"integer inputs up to {float(t.abs().max()):.0f} cannot be carried exactly as {dtype} (above "
                f"{exact:.0f}); use a float64 network"
            )
        columns.append(t.reshape(t.shape[0], -1).to(dtype))
    return torch.cat(columns, dim=1)


class Unpack:
    """The inputs of ``structure`` from their :func:`pack` ed matrix (n, D): each tensor's columns reshaped, integer
    and boolean tensors rounded back to their dtype. The map a GPyTorch model's (n, d) inputs need to reach a
    network that takes token ids, several tensors or a mapping (``JacobianKernel(..., inputs=Unpack(structure))``).
    The inputs of the last matrix unpacked are kept: the same matrix again gives the same tensors (what cached
    linearisations recognise)."""

    def __init__(self, structure: Structure):
        self.structure = structure
        self.widths = [math.prod(shape) for shape in structure.shapes]
        self._last: tuple[Tensor, Inputs] | None = None

    @property
    def width(self) -> int:
        """D, the packed matrix's columns."""
        return sum(self.widths)

    def __call__(self, packed: Tensor) -> Inputs:
        if packed.dim() != 2 or packed.shape[1] != self.width:
            raise ValueError(
                f"packed inputs must have shape (n, {self.width}) for inputs {self.structure}, got "
                f"{tuple(packed.shape)}"
            )
        if self._last is not None and same(self._last[0], packed):
            return self._last[1]
        n, tensors = packed.shape[0], []
        for part, shape, kind in zip(packed.split(self.widths, dim=1), self.structure.shapes, self.structure.dtypes):
            t = part.reshape(n, *shape)
            tensors.append(t if kind == "floating" else t.round().to(getattr(torch, kind)))
        unpacked = Layout(self.structure.kind, self.structure.names).build(tensors)
        if not packed.requires_grad:
            self._last = (packed, unpacked)
        return unpacked


def loader_pair(batch: Any) -> tuple[Inputs, Any]:
    """(x, y) of a DataLoader's batch, or a TypeError saying that the loader must yield such pairs."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        kind = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        raise TypeError(
            f"train_x is a DataLoader whose batches are {kind}; it must yield (x, y) pairs (a TensorDataset(x, y), "
            "or a dataset returning (dict of tensors, label), for example)"
        )
    return batch[0], batch[1]


def gather(loader: Iterable[Any], targets: Any, dtype: torch.dtype, device: torch.device) -> tuple[Inputs, Tensor]:
    """All inputs and targets of a DataLoader of (x, y) batches, checked (every batch with the first one's structure,
    floating tensors in ``dtype``), concatenated (one pass) and moved to ``device``: for the methods that need the
    whole training set at once (the exact GP and the Laplace posterior). ``targets`` (the caller's train_y) must be
    None: the batches hold them."""
    if targets is not None:
        raise ValueError("train_y must be None when train_x is a DataLoader (its batches hold the targets)")
    xs: list[Inputs] = []
    ys: list[Tensor] = []
    for batch in loader:
        x, y = loader_pair(batch)
        like = structure(xs[0]) if xs else None
        xs.append(check_inputs(x, dtype, "the DataLoader's x", like=like, of="its first batch"))
        if not isinstance(y, Tensor):
            raise TypeError(f"the DataLoader's y must be tensors (targets or labels), got {type(y).__name__}")
        ys.append(y)
    if not xs:
        raise ValueError("train_x is a DataLoader that yields no batch")
    return convert(cat(xs), device), torch.cat(ys).to(device)
