"""Names that become paths (case names, run labels, environment names): one safe component, never an escape.

A case file is shared input: `case.name = "../../x"` or an absolute path must not make `--keep DIR` write outside
DIR. The loader refuses such names (spec.validate); everything that turns a name into a path still goes through
`component` and `inside`, so a name that slipped past (a programmatic Spec, a pin label) cannot escape either.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .errors import UsageError

MAX_COMPONENT = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=@-]")


def component(name: str) -> str:
    """`name` as one file-name component: characters outside [A-Za-z0-9._+=@-] become '_', no leading dot (so never
    '.' or '..'), at most MAX_COMPONENT characters (a long name keeps a hash of the whole), never empty."""
    safe = _UNSAFE.sub("_", name).lstrip(".")
    if len(safe) > MAX_COMPONENT:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        safe = f"{safe[: MAX_COMPONENT - 9]}-{digest}"
    return safe or "unnamed"


def inside(parent: Path, name: str) -> Path:
    """parent / component(name), checked to resolve inside `parent`."""
    p = Path(parent) / component(name)
    root = Path(parent).resolve()
    if root not in p.resolve().parents:
        raise UsageError(f"{name!r}: would write outside {parent}; fix: use a plain name")
    return p
