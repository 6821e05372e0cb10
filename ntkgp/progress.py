"""Progress bars: one rule for every entry point, one switch to turn them off.

A bar appears only once its work has run for ``DELAY`` = 1 s (tqdm's ``delay``), so a fast call prints nothing, and
it redraws at most every ``MIN_INTERVAL`` = 0.5 s. Off for the process with the environment variable
``NTKGP_PROGRESS=0`` (also ``false``, ``no``, ``off``), or in code, GPyTorch-settings style::

    with ntkgp.show_progress(False):  # off inside the block
        gp.fit()
    ntkgp.show_progress.set(False)  # off from here on

A call's own ``progress=False`` turns its bars off too; ``progress=True`` never overrides the switch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar", "show_progress"]

DELAY = 1.0
MIN_INTERVAL = 0.5
ENVIRONMENT = "NTKGP_PROGRESS"


class show_progress:  # noqa: N801 (a setting used as a context manager, as gpytorch.settings' are)
    """Progress bars on or off: a context manager, or :meth:`set` for the rest of the process.

    Without either, the environment variable ``NTKGP_PROGRESS`` decides (on unless it is 0, false, no or off).
    """

    _stack: list[bool] = []
    _set: bool | None = None

    def __init__(self, enabled: bool = True):
        if not isinstance(enabled, bool):
            raise TypeError(f"show_progress takes True or False, got {enabled!r}")
        self.enabled = enabled

    def __enter__(self) -> show_progress:
        show_progress._stack.append(self.enabled)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        show_progress._stack.pop()

    @classmethod
    def set(cls, enabled: bool | None) -> None:
        """Bars on (True) or off (False) for the process; None returns the choice to ``NTKGP_PROGRESS``."""
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"show_progress.set takes True, False or None, got {enabled!r}")
        cls._set = enabled

    @classmethod
    def on(cls) -> bool:
        """Whether bars are shown now: the innermost block, else :meth:`set`, else the environment variable."""
        if cls._stack:
            return cls._stack[-1]
        if cls._set is not None:
            return cls._set
        return os.environ.get(ENVIRONMENT, "1").strip().lower() not in ("0", "false", "no", "off")


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **options: Any) -> tqdm:
    """A tqdm bar under the rule of this module: delayed by 1 s, redrawn at most every 0.5 s, and disabled when
    ``enabled`` is False or :class:`show_progress` is off. ``options`` go to tqdm (``desc``, ``total``, ``unit``…)."""
    options.setdefault("delay", DELAY)
    options.setdefault("mininterval", MIN_INTERVAL)
    return tqdm(iterable, disable=not (enabled and show_progress.on()), **options)
