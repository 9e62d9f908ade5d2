"""One `stepdiff` namespace mapped onto adapters/, harness/, reports/ and cases/, in wheel and editable installs.

Each install goes into a fresh virtual environment that sees the packages of the environment running the tests (torch,
transformers, safetensors: a virtual environment, a system install or a fresh clone's CI alike) but gets stepdiff
itself only from the wheel or the editable install under test; a real worker is then launched from it, which proves
the worker bootstrap finds the packages wherever they were installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from stepdiff.harness.envs import uv_binary

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, pkgutil, importlib, stepdiff, stepdiff.harness.spec, stepdiff.adapters.base, stepdiff.reports.terminal
from importlib.resources import files
from stepdiff.harness.registry import adapter_names, get_adapter, knob_class
# every adapter module (the per-framework subpackages too) imports without its framework
modules = [m.name for m in pkgutil.walk_packages(stepdiff.adapters.__path__, "stepdiff.adapters.")]
for m in modules:
    importlib.import_module(m)
adapters = {n: get_adapter(n).__module__ for n in adapter_names()}
knobs = [knob_class(n) for n in adapter_names()]
print(json.dumps({"harness": stepdiff.harness.__file__, "adapters": stepdiff.adapters.__file__,
                  "cases": sorted(p.name for p in files("stepdiff.cases").iterdir() if p.name.endswith(".toml")),
                  "version": stepdiff.__version__, "modules": modules, "registered": adapters}))
"""


def make_venv(path: Path) -> Path:
    """A fresh venv that also sees the running environment's packages.

    `--system-site-packages` alone is not enough: a venv made from a venv's python gets the *base* interpreter's
    site-packages, which lack what the running venv installed (safetensors, transformers). So a .pth file in the new
    venv appends the running environment's own site-packages to sys.path. Only the lines of that .pth are added:
    the running environment's .pth files (its own editable stepdiff finder included) are not processed, and the new
    venv's site-packages stay first on sys.path, so stepdiff comes from the install under test."""
    subprocess.run([uv_binary(), "venv", "--quiet", "--system-site-packages", "--python", sys.executable, str(path)],
                   check=True)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    running = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(site) / "_running_environment.pth").write_text("".join(f"{p}\n" for p in running))
    return python


def probe(python: Path) -> dict:
    import json

    out = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, check=True, cwd="/")
    return json.loads(out.stdout)


def smoke_run(python: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    case = tmp_path / "c.toml"
    case.write_text('[case]\nframeworks = ["faults"]\n[batch]\ngrad_accum = 2\n[faults]\nmode = "drop"\n')
    return subprocess.run([str(python), "-m", "stepdiff", "run", str(case)], capture_output=True, text=True, cwd="/",
                          timeout=600)


@pytest.mark.parametrize("mode", ["wheel", "editable"])
def test_install_modes(tmp_path: Path, mode: str) -> None:
    py = make_venv(tmp_path / "venv")
    if mode == "wheel":
        # from a copy without build outputs: setuptools reuses a checkout's build/ folder, so files a developer's
        # earlier build left there (a module since moved) would land in the wheel and mask a packaging mistake
        src = tmp_path / "src"
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", ".git", "__pycache__",
                                                               ".stepdiff", ".mypy_cache", ".ruff_cache"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
        wheel = next((tmp_path / "dist").glob("stepdiff-*.whl"))
        subprocess.run([uv_binary(), "pip", "install", "--quiet", "--no-deps", "--python", str(py), str(wheel)],
                       check=True)
    else:
        subprocess.run([uv_binary(), "pip", "install", "--quiet", "--no-deps", "--python", str(py), "-e", str(ROOT)],
                       check=True)
    info = probe(py)
    if mode == "wheel":
        assert str(tmp_path / "venv") in info["harness"], info  # from the wheel, not the source tree
    else:
        assert info["harness"] == str(ROOT / "harness" / "__init__.py")
        assert info["adapters"] == str(ROOT / "adapters" / "__init__.py")
    assert "deepspeed-zero2-offload-ga4.toml" in info["cases"]
    for sub in ("deepspeed", "openrlhf", "trl", "verl"):  # the subpackages are in the wheel and the editable map
        assert f"stepdiff.adapters.{sub}.adapter" in info["modules"], info["modules"]
        assert info["registered"][sub] == f"stepdiff.adapters.{sub}.adapter"
    assert info["version"] != "0.0.0+unknown"
    version = subprocess.run([str(tmp_path / "venv" / "bin" / "stepdiff"), "--version"], capture_output=True,
                             text=True, check=True)
    assert version.stdout.startswith("stepdiff ")
    out = smoke_run(py, tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr  # the faults adapter's dropped micro-batch is caught
    assert "dropped-microbatches" in out.stdout
