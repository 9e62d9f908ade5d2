"""Offline environments: a wheelhouse gathered on a connected machine, environments built from it with no index.

For air-gapped GPU clusters. On a machine with an index, `stepdiff env wheelhouse PIN... --dir DIR` resolves each
pin's environment for the *target* interpreter and platform (`--python-version`, `--platform`), downloads binary
wheels, and builds the sdist-only packages (DeepSpeed ships only an sdist) into pure-Python wheels with the
adapter's own build variables (`DS_BUILD_OPS=0`). `--have FILE` (a `pip freeze` of the target) leaves out what the
target already has, so the wheelhouse carries only the difference. `DIR/wheelhouse.json` lists what was gathered.

On the cluster, `STEPDIFF_WHEELHOUSE=DIR` (or `stepdiff env build --wheelhouse DIR`) makes every environment build
install from DIR alone (`pip --no-index`). A CUDA torch of several GB is rarely in a wheelhouse: when DIR holds no
wheel of the host's exact torch version, the environment inherits the host interpreter's site-packages through a
`.pth` file. Its own packages come first on `sys.path`, so a pinned transformers in the environment wins over the
host's; the host's torch, CUDA libraries and anything the requirements leave out are seen as installed, and pip
never uninstalls outside the environment. `env.json` records `torch_source: host-site-packages` in that case.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EnvironmentBuildError, UsageError

MANIFEST = "wheelhouse.json"
ENV_VAR = "STEPDIFF_WHEELHOUSE"
NEVER_GATHERED = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
"""The host's torch and its CUDA stack come from the target machine itself, never from a wheelhouse."""


def configured() -> Path | None:
    """The wheelhouse every environment build uses, from STEPDIFF_WHEELHOUSE (None: builds use the index)."""
    value = os.environ.get(ENV_VAR)
    if not value:
        return None
    path = Path(value)
    if not (path / MANIFEST).is_file() and not any(path.glob("*.whl")):
        raise UsageError(f"{ENV_VAR}={value}: not a wheelhouse (no {MANIFEST} and no wheels); fix: point it at a "
                         "directory made by `stepdiff env wheelhouse`")
    return path


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _name_version(req: str) -> tuple[str, str | None]:
    name, _, version = req.partition("==")
    return _canon(name.split("[")[0].strip()), (version.strip() or None)


def read_have(path: Path | None) -> dict[str, str | None]:
    """`name==version` (or bare `name`) lines of what the target already has: a `pip freeze` of it."""
    if path is None:
        return {}
    have: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, version = _name_version(line.split(" @ ")[0])
            have[name] = version
    return have


@dataclass
class Gathered:
    directory: Path
    environments: dict[str, list[str]] = field(default_factory=dict)
    """Per environment label: the `name==version` pins it resolved to (those left out as `have` included)."""
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Pins left out: the target's torch stack, or what `--have` says the target already has."""


def _pip(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {}), "PIP_DISABLE_PIP_VERSION_CHECK": "1"})


def _one_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip().startswith("ERROR")] or stderr.splitlines()[-2:]
    text = " ".join(lines)
    return text if len(text) <= 300 else text[:297] + "..."


def _fetch(pin: str, directory: Path, python_version: str, platforms: list[str], build_env: dict[str, str]) -> str:
    """One `name==version` into `directory`: its binary wheel for the target, else a pure-Python wheel built here
    from its sdist (a platform wheel built here would not run on the target: refused)."""
    before = set(os.listdir(directory))
    plat = [a for p in platforms for a in ("--platform", p)]
    got = _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
               "--implementation", "cp", *plat, "-d", str(directory), pin)
    if got.returncode != 0:
        with tempfile.TemporaryDirectory() as tmp:
            built = _pip("wheel", "--no-deps", "--no-build-isolation", "-w", tmp, pin, env=build_env)
            if built.returncode != 0:
                raise EnvironmentBuildError(f"{pin}: no wheel for the target and its sdist did not build: "
                                            f"{_one_line(built.stderr)}")
            for whl in Path(tmp).glob("*.whl"):
                if not whl.name.endswith("-none-any.whl"):
                    raise EnvironmentBuildError(f"{pin}: only an sdist with compiled code ({whl.name}); build it on "
                                                "a machine like the target and add it to the wheelhouse")
                shutil.copy2(whl, directory / whl.name)
    new = sorted(set(os.listdir(directory)) - before)
    return new[0] if new else pin


def _resolve(requirements: list[str], directory: Path, python_version: str, platform: str, torch: str,
             have: dict[str, str | None]) -> list[str]:
    """The full closure of `requirements` for the target, as `name==version` lines (uv's resolver; torch fixed to
    the target's version so the closure fits it). The target's own versions are preferred (tried as constraints
    first), so an unpinned requirement the target already satisfies adds nothing to the wheelhouse."""
    from .envs import uv_binary

    preferred = {n: f"{n}=={v}" for n, v in have.items() if v and not NEVER_GATHERED.match(n)}
    for _ in range(8):  # drop the preferences the resolver names as conflicting, then the rest, until it resolves
        with tempfile.TemporaryDirectory() as tmp:
            reqs, cons = Path(tmp) / "requirements.in", Path(tmp) / "constraints.txt"
            reqs.write_text("\n".join([*requirements, f"torch=={torch}"]) + "\n")
            cons.write_text("\n".join(preferred.values()) + "\n")
            proc = subprocess.run([uv_binary(), "pip", "compile", str(reqs), "--constraint", str(cons),
                                   "--python-version", python_version, "--python-platform", platform,
                                   "--find-links", str(directory), "--no-header", "--no-annotate", "--quiet"],
                                  capture_output=True, text=True)
        if proc.returncode == 0 or not preferred:
            break
        named = {n for n in preferred if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", proc.stderr.lower())}
        preferred = {n: c for n, c in preferred.items() if n not in named} if named else {}
    if proc.returncode != 0:
        from .envs import installer_reason

        raise EnvironmentBuildError(f"could not resolve {', '.join(requirements)}: {installer_reason(proc.stderr)}")
    return [ln.strip() for ln in proc.stdout.splitlines() if "==" in ln and not ln.lstrip().startswith("#")]


def gather(labels_and_requests: list[tuple[str, list[str], list[str], dict[str, str]]], directory: Path,
           python_version: str, platform: str, torch: str, have: dict[str, str | None]) -> Gathered:
    """Gather every environment's wheels into `directory`.

    Each entry is (label, requirements resolved with their dependencies, packages installed without their
    dependencies, build variables)."""
    directory.mkdir(parents=True, exist_ok=True)
    out = Gathered(directory)
    platforms = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + ["manylinux2014_x86_64"]
    if not platform.startswith("x86_64"):
        raise UsageError(f"--platform {platform!r}: only x86_64 Linux targets are supported")
    for label, reqs, no_deps, build_env in labels_and_requests:
        # sdist-only top-level pins first, so the resolver finds their wheels in `directory` instead of building them
        for pin in [*reqs, *no_deps]:
            name, version = _name_version(pin)
            if version and not NEVER_GATHERED.match(name) and not any(directory.glob(f"{name.replace('-', '_')}-"
                                                                                    f"{version}-*.whl")):
                out.files.append(_fetch(pin, directory, python_version, platforms, build_env))
        pins = _resolve(reqs, directory, python_version, platform, torch, have) + list(no_deps)
        out.environments[label] = pins
        for pin in pins:
            name, version = _name_version(pin)
            if NEVER_GATHERED.match(name) or (name in have and have[name] in (None, version)):
                out.skipped.append(pin)
                continue
            if any(directory.glob(f"{name.replace('-', '_')}-{version}-*.whl")) or any(
                    directory.glob(f"{name}-{version}-*.whl")):
                continue
            out.files.append(_fetch(pin, directory, python_version, platforms, build_env))
    previous: dict[str, list[str]] = {}
    if (directory / MANIFEST).is_file():  # gathering more into the same wheelhouse keeps what was there
        previous = json.loads((directory / MANIFEST).read_text()).get("environments", {})
    manifest = {"python_version": python_version, "platform": platform, "torch": torch,
                "environments": {**previous, **out.environments}, "skipped": sorted(set(out.skipped)),
                "files": sorted(p.name for p in directory.glob("*.whl"))}
    tmp = directory / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(directory / MANIFEST)
    return out


def host_site_packages() -> list[str]:
    """The running interpreter's own site-packages (a venv's, not its base interpreter's)."""
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return list(dict.fromkeys(p for p in paths if Path(p).is_dir()))


def has_host_torch(wheelhouse: Path, torch_version: str) -> bool:
    return any(wheelhouse.glob(f"torch-{torch_version}-*.whl")) or any(wheelhouse.glob(f"torch-{torch_version}+*"))


def build_offline(d: Path, requirements: list[str], steps: list[list[str]], build_env: dict[str, str],
                  wheelhouse: Path, torch_version: str) -> str:
    """Build environment `d` from the wheelhouse alone; return where its torch comes from."""
    env = {**os.environ, **build_env, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    made = subprocess.run([sys.executable, "-m", "venv", str(d)], capture_output=True, text=True)
    pip = [str(d / "bin" / "python"), "-m", "pip"]
    if made.returncode != 0:  # an interpreter without ensurepip: an empty venv, filled by this interpreter's pip
        shutil.rmtree(d, ignore_errors=True)
        made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(d)], capture_output=True, text=True)
        pip = [sys.executable, "-m", "pip", "--python", str(d / "bin" / "python")]
    if made.returncode != 0:
        raise EnvironmentBuildError(f"python -m venv {d} failed: {_one_line(made.stderr)}")
    python = str(d / "bin" / "python")
    torch_source = "wheelhouse"
    first = [f"torch=={torch_version}", "safetensors", *requirements]
    if not has_host_torch(wheelhouse, torch_version):
        torch_source = "host-site-packages"
        purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        # addsitedir, not bare paths: the host's own .pth files must run too (setuptools' distutils shim, which
        # DeepSpeed's op builder imports on Python >= 3.12)
        lines = [f"import site; site.addsitedir({p!r})" for p in host_site_packages()]
        Path(purelib, "_stepdiff_host_site.pth").write_text("\n".join(lines) + "\n")
    for args in [first, *steps]:
        proc = subprocess.run([*pip, "install", "--no-index", "--find-links", str(wheelhouse),
                               "--no-build-isolation", *args], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise EnvironmentBuildError(f"offline install of {' '.join(args)} from {wheelhouse} failed: "
                                        f"{_one_line(proc.stderr)}; fix: gather it with `stepdiff env wheelhouse`")
    return torch_source


_SEEN = """
import importlib.metadata as m, json
seen = {}
for d in m.distributions():  # sys.path order: the environment's own copy before an inherited host copy
    seen.setdefault(d.metadata["Name"], d.version)
print(json.dumps(seen))
"""


def freeze_offline(python: str) -> dict[str, str]:
    """Every distribution the environment sees (its own and, when inherited, the host's), lower-case names, the
    copy that imports winning."""
    proc = subprocess.run([python, "-c", _SEEN], capture_output=True, text=True)
    if proc.returncode != 0:
        return {}
    return {_canon(name): version for name, version in json.loads(proc.stdout).items() if name}
