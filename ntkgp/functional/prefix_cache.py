"""The frozen prefix, run once: its output h kept per input tensor, so that every product runs through the rest only.

:func:`~ntkgp.functional.frozen_prefix.split_network` finds the cut; this part checks it on the first inputs (a cut
whose value is not one tensor with the inputs' rows first is refused and the next one taken; a split that disagrees
with the whole network is dropped with a warning), and keeps h for recent input tensors (and their row blocks) within
a memory budget, least recently used first out. Only one-tensor inputs are split: a network called with several
tensors or a mapping has more than one input node, and runs whole.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections import OrderedDict

import torch
from torch import Tensor, nn

from ..inputs import Inputs
from ..validation import as_count
from .checked_batching import relative_difference
from .frozen_prefix import NetworkSplit, split_network
from .snapshot import Snapshot

__all__ = ["PrefixCache"]


class PrefixCache(Snapshot):
    """The frozen prefix's output h for recent input tensors (up to ``feature_cache_bytes``)."""

    split: NetworkSplit | None

    def _init_prefix(self, frozen_prefix: bool, feature_cache_bytes: int) -> None:
        if not isinstance(frozen_prefix, bool):
            raise TypeError(f"frozen_prefix must be True or False, got {frozen_prefix!r}")
        self.feature_cache_bytes = as_count(feature_cache_bytes, "feature_cache_bytes", minimum=0)
        self.split = split_network(self.module, self.names) if frozen_prefix else None
        self._split_checked = False

    def module_copy(self, suffix: bool = False) -> nn.Module:
        """A copy of the module holding the snapshot (θ0, frozen weights, buffers), in eval mode, with
        ``requires_grad`` on the selected parameters only: for libraries that need a module (curvlinops).
        ``suffix``: only the part after the frozen prefix, whose inputs are ``features`` (the whole module
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

    def _reset_checks(self) -> None:
        super()._reset_checks()
        self._features: OrderedDict[int, tuple[weakref.ref, int, Tensor]] = OrderedDict()  # id(x) -> h

    def splits(self, x: Inputs) -> bool:
        """Whether products at x run through the split (one tensor of inputs, a split that holds)."""
        if self.split is None or not isinstance(x, Tensor):
            return False
        if not self._split_checked:
            self._check_split(x)
        return self.split is not None

    def features(self, x: Inputs) -> Inputs:
        """The frozen prefix's output h for inputs x: x itself when not split; computed once per input tensor (while
        it is alive and unchanged) unless x requires grad or is inside a torch.func transform."""
        if not self.splits(x):
            return x
        assert isinstance(x, Tensor) and self.split is not None
        if torch._C._functorch.is_functorch_wrapped_tensor(x) or (x.requires_grad and torch.is_grad_enabled()):
            return self._run(self.split.prefix, None, x)
        cached = self._cached_features(x)
        if cached is not None:
            return cached
        with torch.no_grad():
            h = self._run(self.split.prefix, None, x)
        self._remember(x, h)
        return h

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
        cut taken (:func:`~ntkgp.functional.frozen_prefix.split_network`)."""
        refused: set[str] = set()
        with torch.no_grad():
            while self.split is not None:
                h = self._run(self.split.prefix, None, x[:2])
                if isinstance(h, Tensor) and h.dim() > 0 and h.shape[0] == x[:2].shape[0]:
                    break
                refused.add(self.split.node)
                self.split = split_network(self.module, self.names, refused)
            if self.split is None:
                self._split_checked = True
                return
            whole = self._run(self.module, self.theta0, x[:2])
            parts = self._run(self.split.suffix, self.theta0, h)
        same = isinstance(whole, Tensor) and isinstance(parts, Tensor) and whole.shape == parts.shape
        difference = relative_difference(whole, parts) if same else float("inf")
        if difference > 10 * torch.finfo(self.dtype).eps ** 0.5:
            warnings.warn(
                f"the network split at its frozen prefix ({self.split.cut}) disagrees with the whole network "
                f"(relative difference {difference:.2g}); running the whole network in every product",
                RuntimeWarning,
                stacklevel=4,
            )
            self.split = None
        self._split_checked = True
