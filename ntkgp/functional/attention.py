"""Attention that torch.func can differentiate: the math scaled-dot-product-attention backend, MHA's fast path off.

With parameters that do not require grad (how ``functional_call`` hands them to the network), ``nn.MultiheadAttention``
and ``nn.TransformerEncoderLayer`` take torch's fast path (``aten::_native_multi_head_attention``), and
``F.scaled_dot_product_attention`` picks the flash kernel on the CPU: neither has a forward-mode rule, and the flash
kernel has no double backward. The math backend is plain differentiable ops. Both switches are process-wide, so every
network call of ntkgp's products sets them and restores the caller's own settings afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["differentiable_attention"]


@contextmanager
def differentiable_attention() -> Iterator[None]:
    """Within this context, scaled-dot-product attention uses the math backend and ``nn.MultiheadAttention``'s
    fast path is off; the caller's settings are restored on exit (also on an error)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
