"""MkDocs hook: the docstrings' Sphinx roles (:class:`~ntkgp.X`, :meth:`fit`, :mod:`ntkgp.inputs`, …), which
mkdocstrings leaves as text before the code they name, become the code alone; a leading ``~`` keeps the last
dotted component, as Sphinx shows it."""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:class|meth|func|mod|attr|data|obj|exc):<code>(~?)([^<]*)</code>")


def _shown(match: re.Match[str]) -> str:
    short, name = match.groups()
    return f"<code>{name.rsplit('.', 1)[-1] if short else name}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    return ROLE.sub(_shown, html)
