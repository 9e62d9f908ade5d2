"""stepdiff: differential tester for LLM training frameworks.

`import stepdiff` imports no framework and no torch: the rooms (`stepdiff.harness`, `stepdiff.adapters`,
`stepdiff.reports`) are imported on demand.
"""

from __future__ import annotations

from importlib import metadata as _metadata
from pathlib import Path as _Path

# Run from a checkout (`python -m stepdiff`, `python -m pytest` in the repo root), this folder is imported ahead of
# any installed copy, and the rooms are its siblings, not its children: put the checkout's root on the package path
# so `stepdiff.harness` is `harness/` there, as the install's package-dir mapping makes it.
_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).resolve().parent / "harness").is_dir() and (_root / "harness" / "__init__.py").is_file():
    __path__.append(str(_root))  # type: ignore[name-defined]

try:
    __version__ = _metadata.version("stepdiff")
except _metadata.PackageNotFoundError:  # running from a bare source tree
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
