"""The rooms keep their contracts, read from the import statements themselves (parsed with `ast`, not grepped):

- adapters know their framework, the spec, the record and the data placement, and nothing of reports or of the
  comparison (diff, tolerance, signatures, compare) or the machinery that runs them (runner, workers, envs, cli);
- adapters import their framework (and torch/transformers) only inside functions, so `stepdiff list` and the host's
  checks never import a framework;
- the comparison modules know tensors, not frameworks or adapters; reports know results, not frameworks or adapters;
- `stepdiff/_util.py`, shared by both rooms, imports only the standard library;
- no class in adapters/, harness/, reports/ or stepdiff/ is longer than MAX_CLASS_LINES (a class that outgrows it
  holds more than one job: split it by moving a job out, not by squeezing lines).
Each rule has a sibling test proving the checker finds a violation.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = {"deepspeed", "openrlhf", "trl", "verl", "accelerate", "peft", "flash_attn", "ray", "vllm", "datasets",
              "tensordict"}
HEAVY = FRAMEWORKS | {"torch", "transformers", "safetensors", "numpy"}
ADAPTER_MAY_IMPORT = {"stepdiff.harness.spec", "stepdiff.harness.record", "stepdiff.harness.data",
                      "stepdiff.harness.model", "stepdiff.harness.sketch", "stepdiff.harness.optim"}
"""What an adapter may take from the harness: the contracts (spec, record, data placement), the model config the
shared initial weights were written for (harness.model.hf_config), the sketch format of the reference's recorded
contributions (harness.sketch, a record format for real-size models) and the spec's optimizer written out
(harness.optim: the `faults` self-test breaks it on purpose)."""
MAX_CLASS_LINES = 250
COMPARISON = ("diff", "tolerance", "signatures", "compare", "optim", "optsig", "calibration")


def imports(path: Path, package: str) -> list[tuple[str, list[str], bool]]:
    """One row per imported name in `path`: (the module imported from, the candidate module names, at module level?).
    `from pkg import x` may import the submodule pkg.x, so both are candidates; relative imports are resolved
    against `package` (the dotted package the file belongs to). `if ...:` blocks at module level count as module
    level."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for node in tree.body for n in ast.walk(node) if not isinstance(node, (ast.FunctionDef,
                                                                                         ast.ClassDef))}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [a.name], id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                module = ".".join([*parts, node.module] if node.module else parts)
            else:
                module = node.module or ""
            out += [(module, [module, f"{module}.{a.name}"], id(node) in top) for a in node.names]
    return out


def type_checking_only(path: Path) -> set[str]:
    """Modules imported only under `if TYPE_CHECKING:` (never at run time)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import):
                    names |= {a.name for a in sub.names}
                elif isinstance(sub, ast.ImportFrom) and sub.module:
                    names.add(sub.module)
    return names


def room_files(room: str, namespace: str) -> list[tuple[Path, str]]:
    """(file, the dotted package it belongs to) for every module of a room."""
    out = []
    for path in sorted((ROOT / room).rglob("*.py")):
        rel = path.relative_to(ROOT / room).with_suffix("")
        parts = [namespace, *rel.parts]
        package = ".".join(parts if path.name == "__init__.py" else parts[:-1])
        out.append((path, package))
    return out


def adapter_violations(path: Path, package: str) -> list[str]:
    bad = []
    lazy_ok = type_checking_only(path)
    for module, candidates, top in imports(path, package):
        if module.startswith("stepdiff.reports"):
            bad.append(f"imports {module} (adapters know nothing of reports)")
        elif module.startswith("stepdiff.harness") and not any(
                c == m or c.startswith(m + ".") for c in candidates for m in ADAPTER_MAY_IMPORT):
            bad.append(f"imports {candidates[-1]} (adapters take only spec/record/data/model from the harness)")
        elif top and module.split(".")[0] in HEAVY and module not in lazy_ok:
            bad.append(f"imports {module} at module level (frameworks are imported inside functions)")
    return bad


def framework_free_violations(path: Path, package: str) -> list[str]:
    return [f"imports {module}" for module, _, _ in imports(path, package)
            if module.split(".")[0] in FRAMEWORKS or module.startswith("stepdiff.adapters")]


def test_adapters_import_no_reports_comparison_or_module_level_framework() -> None:
    found = {str(p.relative_to(ROOT)): v for p, pkg in room_files("adapters", "stepdiff.adapters")
             if (v := adapter_violations(p, pkg))}
    assert not found, found
    assert len(room_files("adapters", "stepdiff.adapters")) > 30  # the walk reaches the framework subpackages


def test_comparison_and_reports_import_no_framework_and_no_adapter() -> None:
    files = [(ROOT / "harness" / f"{m}.py", "stepdiff.harness") for m in COMPARISON]
    files += room_files("reports", "stepdiff.reports")
    found = {str(p.relative_to(ROOT)): v for p, pkg in files if (v := framework_free_violations(p, pkg))}
    assert not found, found


def test_harness_imports_no_framework() -> None:
    found = {str(p.relative_to(ROOT)): [m for m, _, _ in imports(p, pkg) if m.split(".")[0] in FRAMEWORKS]
             for p, pkg in room_files("harness", "stepdiff.harness")}
    assert not {k: v for k, v in found.items() if v}, found


def test_shared_util_is_standard_library_only() -> None:
    names = {m.split(".")[0] for m, _, _ in imports(ROOT / "stepdiff" / "_util.py", "stepdiff")} - {"__future__"}
    assert names <= set(sys.stdlib_module_names), names


def long_classes(path: Path, limit: int = MAX_CLASS_LINES) -> list[str]:
    """'file:line Name (N lines)' for every class in `path` longer than `limit` lines (decorators not counted)."""
    tree = ast.parse(path.read_text(), str(path))
    return [f"{path}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, ast.ClassDef) and n.end_lineno is not None and n.end_lineno - n.lineno + 1 > limit]


def test_no_class_over_the_limit() -> None:
    found = [c for room in ("adapters", "harness", "reports", "stepdiff") for path, _ in room_files(room, "stepdiff")
             for c in long_classes(path)]
    assert not found, found


def test_long_class_checker_finds_one(tmp_path: Path) -> None:
    f = tmp_path / "big.py"
    f.write_text("class Small:\n    x = 1\n\n\nclass Big:\n" + "    x = 1\n" * 9)
    assert long_classes(f, limit=9) == [f"{f}:5 Big (10 lines)"]


@pytest.mark.parametrize(("source", "expected"), [
    ("from stepdiff.reports import terminal\n", "reports"),
    ("from stepdiff.harness.diff import dict_diff\n", "only spec/record/data/model"),
    ("from ...harness.tolerance import Bound\n", "only spec/record/data/model"),
    ("import deepspeed\n", "module level"),
    ("from torch import nn\n", "module level"),
])
def test_adapter_checker_finds_violations(tmp_path: Path, source: str, expected: str) -> None:
    f = tmp_path / "bad.py"
    f.write_text("from __future__ import annotations\n" + source + "\n\ndef ok() -> None:\n    import trl\n")
    found = adapter_violations(f, "stepdiff.adapters.trl")
    assert len(found) == 1 and expected in found[0], found


def test_framework_free_checker_finds_violations(tmp_path: Path) -> None:
    f = tmp_path / "bad.py"
    f.write_text("def fit() -> None:\n    import deepspeed\n    from ..adapters.base import Adapter\n")
    found = framework_free_violations(f, "stepdiff.harness")
    assert found == ["imports deepspeed", "imports stepdiff.adapters.base"]
