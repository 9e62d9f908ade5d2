"""stepdiff: differential tester for LLM training frameworks.

`import stepdiff` imports no framework and no torch: the rooms (`stepdiff.harness`, `stepdiff.adapters`,
`stepdiff.reports`) are imported on demand.
"""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("stepdiff")
except _metadata.PackageNotFoundError:  # running from a bare source tree
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
