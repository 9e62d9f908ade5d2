"""Environments: one virtual environment per (adapter, version set), built with uv and cached.

Torch is pinned to the host's exact version in every environment (as a constraint for the install and for any sdist
build), so no environment ever pulls another torch. uv does not read pip's configuration, so pip's configured
find-links (where the host's torch wheel lives) are passed through explicitly. The resolved versions are written to
`env.json`, which is also the marker of a finished build: a directory without it is a broken build and is rebuilt.

Before a cached environment is used it is verified against `manifest.json`, written at the end of its build: every
installed distribution with its version and every file it installed with its size and modification time (bytecode
caches aside), plus the pins the request asked for. A missing, truncated or rewritten file (an edit of the same size
changes the modification time: no hashing of gigabytes before every run), a changed version, an unreadable env.json
or a missing interpreter make the environment broken: it is rebuilt with a one-line notice, never run (a corrupt
cache must not read as a framework failure). Every cached artefact is written atomically (a temporary name unique to
the writer, then os.replace), and a build that is interrupted leaves no env.json, so it is never mistaken for a
finished one.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from . import wheelhouse
from .errors import EnvironmentBuildError, UsageError
from .registry import get_adapter

ENV_FORMAT = 2
MANIFEST_FORMAT = 2
"""2 adds each distribution's `mtimes` (file -> st_mtime_ns) beside `files` (file -> size), which stays as in 1 so
that older stepdiff processes sharing the cache still read it; a format-1 manifest is upgraded once verified."""
_VERIFIED: dict[Path, float] = {}
"""Environments verified by this process (env.json mtime): verification runs once per process and environment."""


class BrokenEnvironment(Exception):
    """A cached environment that no longer matches its manifest (one line: what is wrong)."""


def write_atomic(path: Path, text: str) -> None:
    """Write a cached artefact so that no reader ever sees it half-written and two writers never share a temporary
    file: a name unique to this process and call, then os.replace."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_root() -> Path:
    return Path(os.environ.get("STEPDIFF_CACHE", Path.home() / ".cache" / "stepdiff"))


def host_torch_version() -> str:
    """The host's torch version without the local tag ('2.13.0+cpu' -> '2.13.0')."""
    try:
        return metadata.version("torch").split("+")[0]
    except metadata.PackageNotFoundError:
        raise UsageError("torch is not installed on the host; install it first (see README)") from None


@functools.lru_cache(maxsize=1)
def pip_find_links() -> tuple[str, ...]:
    """pip's configured find-links (env var and config files), which uv would otherwise not see."""
    links: list[str] = []
    for chunk in os.environ.get("PIP_FIND_LINKS", "").split():
        links.append(chunk)
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip().endswith("find-links"):
            links.extend(value.strip().strip("'\"").split())
    return tuple(dict.fromkeys(links))


def uv_binary() -> str:
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except Exception:
        found = shutil.which("uv")
        if not found:
            raise UsageError("uv is not installed; run `pip install uv`") from None
        return found


@dataclass(frozen=True)
class EnvRequest:
    adapter: str
    version: str | None
    requirements: tuple[str, ...]
    build_env: tuple[tuple[str, str], ...] = ()
    steps: tuple[tuple[str, ...], ...] = ()
    """Further `uv pip install` argument lists, run in order after the main install."""
    extra_pins: tuple[str, ...] = ()
    """User pins of other packages in the version set (e.g. 'deepspeed==0.18.9' next to trl)."""

    @property
    def key(self) -> str:
        parts = [ENV_FORMAT, self.adapter, self.version, self.requirements, self.build_env, self.steps,
                 self.extra_pins, host_torch_version(), sys.version_info[:2]]
        house = wheelhouse.configured()
        if house is not None:  # an offline build is a different environment (host site-packages, other wheels)
            parts.append(str(house.resolve()))
        blob = json.dumps(parts)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        base = f"{self.adapter}=={self.version}" if self.version else self.adapter
        return ",".join([base, *self.extra_pins])


@dataclass
class Environment:
    name: str
    path: Path
    python: str
    versions: dict[str, str] = field(default_factory=dict)
    build_s: float = 0.0
    cached: bool = True


def _dist_name(requirement: str) -> str:
    for sep in ("==", ">=", "<=", "~=", "!=", ">", "<", "[", " ", ";", "@"):
        requirement = requirement.split(sep, 1)[0]
    return requirement.strip().lower().replace("_", "-")


def request_for(adapter: str, version: str | None, extra_pins: tuple[str, ...] = ()) -> EnvRequest:
    """The environment request of a framework run. Extra pins replace the adapter's requirement of the same
    distribution (or add one), in the main install and in every install step."""
    cls = get_adapter(adapter)
    pinned = {_dist_name(p): p for p in extra_pins}

    def apply(reqs: list[str]) -> list[str]:
        out = [pinned.get(_dist_name(r), r) if not r.startswith("-") else r for r in reqs]
        return out

    from stepdiff.adapters.base import ReleaseLookupError

    try:
        reqs = apply(cls.requirements(version))
        steps = [tuple(apply(step)) for step in cls.install_steps(version)]
    except ReleaseLookupError as e:
        raise EnvironmentBuildError(f"{adapter}=={version}: {e}") from None
    have = {_dist_name(r) for r in reqs}
    have |= {_dist_name(a) for step in steps for a in step if not a.startswith("-")}
    reqs += [p for name, p in pinned.items() if name not in have]
    return EnvRequest(adapter, version, tuple(reqs), tuple(sorted(cls.build_env(version).items())), tuple(steps),
                      tuple(extra_pins))


def env_dir(req: EnvRequest) -> Path:
    """The environment's folder: one safe path component from its label (never a way out of the cache)."""
    from .safepath import component

    safe = component(req.label.replace("==", "-").replace(",", "+"))
    return cache_root() / "envs" / f"{safe}-{req.key}"


def host_environment() -> Environment:
    """The reference runs in the host's own python (it needs only torch and transformers)."""
    return Environment(name="host", path=Path(sys.prefix), python=sys.executable,
                       versions={d: _dist_version(d) for d in ("torch", "transformers", "safetensors")})


def _dist_version(d: str) -> str:
    try:
        return metadata.version(d)
    except metadata.PackageNotFoundError:
        return "missing"


def ensure(req: EnvRequest, log: bool = True) -> Environment:
    """The environment for `req`: the cached one once verified against its manifest, else built (or rebuilt, with a
    one-line notice, when the cached one is broken). Raises EnvironmentBuildError with uv's reason."""
    d = env_dir(req)
    d.parent.mkdir(parents=True, exist_ok=True)
    with open(d.parent / f".{d.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent runs (pytest-xdist) build each environment once
        marker = d / "env.json"
        if marker.exists():
            try:
                info = verify(req, d)
                return Environment(req.label, d, str(d / "bin" / "python"), info["versions"], info["build_s"], True)
            except BrokenEnvironment as e:
                _VERIFIED.pop(d, None)
                print(f"stepdiff: cached environment {req.label} is broken ({e}); rebuilding it", file=sys.stderr,
                      flush=True)
        if d.exists():
            shutil.rmtree(d)
        if log:
            print(f"stepdiff: building environment {req.label} (torch=={host_torch_version()}) ...", file=sys.stderr,
                  flush=True)
        t0 = time.perf_counter()
        house = wheelhouse.configured()
        torch_source = "index"
        try:
            if house is None:
                _build(req, d)
            else:
                torch_source = wheelhouse.build_offline(d, list(req.requirements), [list(s) for s in req.steps],
                                                        dict(req.build_env), house, host_torch_version())
            versions = _freeze(d) if house is None else wheelhouse.freeze_offline(str(d / "bin" / "python"))
            try:
                _check_pins(req, versions)
            except BrokenEnvironment as e:
                raise EnvironmentBuildError(f"{req.label}: the installer did not honour the pins: {e}") from None
            build_s = time.perf_counter() - t0
            write_atomic(d / "manifest.json", json.dumps(manifest(d, versions)))
            # env.json last: it is the marker of a finished build
            write_atomic(marker, json.dumps({"request": asdict(req), "versions": versions, "build_s": build_s,
                                             "python": sys.version.split()[0], "torch_source": torch_source,
                                             "wheelhouse": str(house) if house else None}, indent=1))
        except BaseException:  # a failed or interrupted build leaves nothing that could pass for an environment
            shutil.rmtree(d, ignore_errors=True)
            raise
        _VERIFIED[d] = marker.stat().st_mtime
        if log:
            print(f"stepdiff: built {req.label} in {build_s:.1f} s", file=sys.stderr, flush=True)
        return Environment(req.label, d, str(d / "bin" / "python"), versions, build_s, False)


def site_packages(d: Path) -> Path:
    found = sorted(d.glob("lib/python*/site-packages"))
    if not found:
        raise BrokenEnvironment("no lib/python*/site-packages")
    return found[0]


def _skip(rel: str) -> bool:
    """Files that legitimately change after the build: bytecode caches (and anything outside site-packages)."""
    return "__pycache__" in rel or rel.endswith((".pyc", ".pyo")) or rel.startswith("..")


def manifest(d: Path, versions: dict[str, str]) -> dict[str, Any]:
    """Every distribution installed in the environment, its version and the size and modification time of every file
    it installed."""
    sp = site_packages(d)
    dists: dict[str, Any] = {}
    for dist in metadata.distributions(path=[str(sp)]):
        name = _canonical(dist.metadata["Name"] or "")
        files, mtimes = {}, {}
        for f in dist.files or []:
            rel = str(f)
            if _skip(rel):
                continue
            try:
                st = (sp / rel).stat()
            except OSError:
                continue  # RECORD lists it but the installer did not create it (e.g. an optional script)
            files[rel] = st.st_size
            mtimes[rel] = st.st_mtime_ns
        dists[name] = {"version": dist.version, "files": files, "mtimes": mtimes}
    return {"format": MANIFEST_FORMAT, "python": str(d / "bin" / "python"), "dists": dists,
            "pinned": {k: v for k, v in versions.items() if k in ("torch",)}}


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def _check_pins(req: EnvRequest, versions: dict[str, str]) -> None:
    """The environment holds what the request pinned: the framework's release, the extra pins, the host's torch."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    want = {"torch": f"=={host_torch_version()}"}
    if req.version:
        want[_canonical(req.adapter)] = f"=={req.version}"
    for r in req.extra_pins:
        name = _dist_name(r)
        want[name] = r[len(name):] if r.lower().startswith(name) else ""
    have_all = {_canonical(k): v for k, v in versions.items()}
    for name, spec in want.items():
        have = have_all.get(name)
        if have is None and name == _canonical(req.adapter):
            continue  # the adapter's distribution has another name: its requirement pinned it
        if have is None:
            raise BrokenEnvironment(f"{name} is not installed")
        try:
            ok = not spec or SpecifierSet(spec).contains(have.split("+")[0], prereleases=True)
        except InvalidSpecifier:
            ok = True
        if not ok:
            raise BrokenEnvironment(f"{name} is {have}, the pin asks for {name}{spec}")


def verify(req: EnvRequest, d: Path) -> dict[str, Any]:
    """Check a cached environment against its manifest; return its env.json. Raises BrokenEnvironment."""
    marker = d / "env.json"
    try:
        info = json.loads(marker.read_text())
        if not isinstance(info, dict) or not isinstance(info.get("versions"), dict):
            raise ValueError("no versions")
        info.setdefault("build_s", 0.0)
    except (OSError, ValueError) as e:
        raise BrokenEnvironment(f"env.json unreadable: {e}") from None
    mtime = marker.stat().st_mtime
    if _VERIFIED.get(d) == mtime:
        return info
    if not os.path.exists(d / "bin" / "python"):
        raise BrokenEnvironment("bin/python is missing")
    path = d / "manifest.json"
    try:
        man = json.loads(path.read_text())
    except FileNotFoundError:
        man = None
    except (OSError, ValueError) as e:
        raise BrokenEnvironment(f"manifest.json unreadable: {e}") from None
    sp = site_packages(d)
    if man is None:  # built before manifests existed: check the installers' own RECORD sizes, then keep a manifest
        _verify_records(sp)
        write_atomic(path, json.dumps(manifest(d, info["versions"])))
    else:  # the dist-info folder names carry the versions: same files with the same sizes = same versions
        root = f"{sp}{os.sep}"
        try:
            dists = [(str(name), entry["files"].items(), dict(entry.get("mtimes") or {}))
                     for name, entry in man["dists"].items()]
        except (KeyError, TypeError, AttributeError, ValueError):
            raise BrokenEnvironment("manifest.json malformed") from None
        for name, files, mtimes in dists:
            for rel, size in files:
                when = mtimes.get(rel)
                try:
                    st = os.stat(root + rel)
                except OSError:
                    raise BrokenEnvironment(f"{name}: {rel} is missing") from None
                if st.st_size != size:
                    raise BrokenEnvironment(f"{name}: {rel} has {st.st_size} bytes, {size} when built")
                if when is not None and st.st_mtime_ns != when:
                    raise BrokenEnvironment(f"{name}: {rel} was rewritten after the build (same size, modified "
                                            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(st.st_mtime))})")
    _check_pins(req, info["versions"])
    if man is not None and man.get("format") != MANIFEST_FORMAT:  # older, verified by sizes: keep the times from now on
        write_atomic(path, json.dumps(manifest(d, info["versions"])))
    _VERIFIED[d] = mtime
    return info


def _verify_records(sp: Path) -> None:
    for dist in metadata.distributions(path=[str(sp)]):
        for f in dist.files or []:
            rel = str(f)
            if _skip(rel) or f.size is None:
                continue
            try:
                actual = (sp / rel).stat().st_size
            except OSError:
                raise BrokenEnvironment(f"{dist.metadata['Name']}: {rel} is missing") from None
            if actual != f.size:
                raise BrokenEnvironment(f"{dist.metadata['Name']}: {rel} has {actual} bytes, {f.size} installed")


def _run_uv(args: list[str], env: dict[str, str], what: str) -> None:
    from .procs import die_with_parent

    proc = subprocess.run([uv_binary(), *args], capture_output=True, text=True, env=env, preexec_fn=die_with_parent())
    if proc.returncode != 0:
        raise EnvironmentBuildError(f"{what} could not be installed: {installer_reason(proc.stderr)}")


def _build(req: EnvRequest, d: Path) -> None:
    env = {**os.environ, **dict(req.build_env), "UV_NO_PROGRESS": "1"}
    _run_uv(["venv", "--quiet", "--python", sys.executable, str(d)], env, req.label)
    constraints = d / "stepdiff-constraints.txt"
    constraints.write_text(f"torch=={host_torch_version()}\n")
    links = [a for link in pip_find_links() for a in ("--find-links", link)]
    args = ["pip", "install", "--python", str(d / "bin" / "python"), *links, "--constraint", str(constraints),
            "--build-constraints", str(constraints), "--compile-bytecode",
            f"torch=={host_torch_version()}", "safetensors", *req.requirements]
    _run_uv(args, env, req.label)
    for step in req.steps:
        _run_uv(["pip", "install", "--python", str(d / "bin" / "python"), *links, "--constraint", str(constraints),
                 "--build-constraints", str(constraints), *step], env, req.label)


def _freeze(d: Path) -> dict[str, str]:
    out = subprocess.run([uv_binary(), "pip", "freeze", "--python", str(d / "bin" / "python")],
                         capture_output=True, text=True).stdout
    versions = {}
    for line in out.splitlines():
        if "==" in line:
            name, _, ver = line.partition("==")
            versions[name.strip().lower()] = ver.strip()
    return versions


def installer_reason(stderr: str) -> str:
    """uv's explanation squeezed onto one line (the lines after 'x' / 'because', without box drawing)."""
    keep = []
    for raw in stderr.splitlines():
        line = raw.strip().lstrip("×╰─▶│ ").strip()
        if not line or line.startswith(("Using ", "Resolved ", "Prepared ", "Installed ", "Audited ")):
            continue
        keep.append(line)
    reason = " ".join(keep) or "uv failed without a message"
    return reason if len(reason) <= 400 else reason[:397] + "..."


def list_envs() -> list[dict[str, object]]:
    root = cache_root() / "envs"
    rows = []
    if root.exists():
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            marker = d / "env.json"
            info = None
            try:
                info = json.loads(marker.read_text()) if marker.exists() else None
            except (OSError, ValueError):
                info = None  # broken: listed as incomplete, rebuilt on next use
            if isinstance(info, dict) and isinstance(info.get("versions"), dict):
                rows.append({"name": d.name, "path": str(d), "request": info.get("request"),
                             "versions": info["versions"], "build_s": info.get("build_s"), "size_mb": _size_mb(d)})
            else:
                rows.append({"name": d.name, "path": str(d), "request": None, "versions": {}, "build_s": None,
                             "size_mb": _size_mb(d)})
    return rows


def remove_envs(pattern: str | None) -> list[str]:
    removed = []
    for row in list_envs():
        if pattern is None or pattern in str(row["name"]):
            shutil.rmtree(str(row["path"]), ignore_errors=True)
            removed.append(str(row["name"]))
    return removed


def _size_mb(d: Path) -> float:
    total = 0
    for root, _, files in os.walk(d):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return round(total / 2**20, 1)
