"""Which parameters a linearisation is in: names or module prefixes, in the module's own order."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["select_parameters"]


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
