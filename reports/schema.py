"""The JSON Schema of the report, shipped in the package (`schema/result-<N>.schema.json`), and validation against
it. `stepdiff report` and `stepdiff compare` validate every document they read; the test suite validates every
report it writes."""

from __future__ import annotations

import functools
import json
from importlib.resources import files
from typing import Any

from .json_report import SCHEMA


def path(version: int = SCHEMA) -> str:
    """Where the schema file of `version` lies inside the installed package."""
    return str(files("stepdiff.reports") / "schema" / f"result-{version}.schema.json")


@functools.lru_cache(maxsize=2)
def load(version: int = SCHEMA) -> dict[str, Any]:
    return dict(json.loads((files("stepdiff.reports") / "schema" / f"result-{version}.schema.json").read_text()))


def problems(doc: Any, limit: int = 5) -> list[str]:
    """Why `doc` does not match the schema, one line each with the JSON path of the offending field (empty: valid)."""
    import jsonschema

    root = load()
    # the top level is a oneOf (one case, or several): validate against the branch the document claims to be, so
    # the errors name its own fields instead of the other branch's
    branch = {k: v for k, v in root.items() if k != "oneOf"}
    kind = "multi" if isinstance(doc, dict) and "cases" in doc else "case"
    branch["$ref"] = f"#/$defs/{kind}"
    validator = jsonschema.Draft202012Validator(branch)
    out = []
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        where = "/".join(map(str, err.absolute_path)) or "(top level)"
        out.append(f"{where}: {err.message}")
        if len(out) >= limit:
            break
    return out


def validate(doc: Any) -> None:
    """Raise ValueError naming the first problems when `doc` does not match the schema."""
    bad = problems(doc)
    if bad:
        raise ValueError("report does not match its schema: " + "; ".join(bad))
