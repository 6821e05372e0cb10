"""Fixtures for everything pytest collects here, the markdown files included (tests/conftest.py has the suite's)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _markdown_blocks_run_as_users_run_them(request):
    """The README's and docs/' code blocks run under torch's own default dtype, float32 (tests/conftest.py makes it
    float64 for the suite, process-wide), and whatever default a block sets is undone after it."""
    if request.node.path.suffix != ".md":
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _quiet_print(*values: object, **options: object) -> None:
    """print for the docs' code blocks: to a file when given one, else nowhere."""
    if options.get("file") is not None:
        print(*values, **options)  # type: ignore[call-overload]


def pytest_markdown_docs_globals() -> dict:
    """What the blocks print stays out of the test log (pytest-markdown-docs runs them with pytest's capture off, and
    the site's figures are printed SVG); the site shows it."""
    return {"print": _quiet_print}
