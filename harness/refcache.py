"""Cached reference results: the reference record of a spec (and its float64 self-error) computed once and reused.

The reference is a pure function of the spec's fields it reads (model, data, batch, optimizer, loss, rl, device),
the initial weights (a function of the model fields), the host's torch and transformers, and stepdiff's own code
that computes it. The cache key hashes exactly those: the spec without `case` (name, description, frameworks),
`run.timeout_s`, `run.reference_timeout_s` and the per-framework knob tables (the reference never reads them); the
request options (float64, token step); the host's torch, transformers and safetensors versions; stepdiff's version
and a digest of the source files of the modules that compute the reference and of every stepdiff module they import,
lazily or not (so editing the reference, or a helper it reaches such as the contribution sketches, in a development
checkout invalidates the cache even though the version string did not move).

An entry is a directory `<cache>/reference/<key[:2]>/<key>/` holding the record as `Record.save` writes it plus
`manifest.json` (the key material, each file's size and SHA-256, and small values such as the self-error). Entries
are written to a temporary directory and renamed into place, so a reader sees a whole entry or none. A reader
re-hashes every file against the manifest: a corrupt, truncated or foreign entry is removed and recomputed, never
trusted. `--no-cache` (or STEPDIFF_NO_CACHE=1) bypasses the cache for reading and writing; STEPDIFF_REFCACHE
moves it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .spec import Spec, to_dict

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
MAX_ENTRY_BYTES = int(float(os.environ.get("STEPDIFF_REFCACHE_MAX_ENTRY_MB", "1024")) * 2**20)
"""Records larger than this are not cached (a ~100M-parameter record with per-micro-batch contributions is GBs)."""
MAX_TOTAL_BYTES = int(float(os.environ.get("STEPDIFF_REFCACHE_MAX_MB", "4096")) * 2**20)
"""The cache is pruned, least recently used first, to stay under this."""

# The modules whose code decides the reference's numbers. A package (after a move into adapters/<name>/) is hashed
# whole.
SOURCE_MODULES = ("stepdiff.adapters.reference", "stepdiff.adapters.base", "stepdiff.adapters.common",
                  "stepdiff.harness.data", "stepdiff.harness.model", "stepdiff.harness.record", "stepdiff.harness.spec",
                  "stepdiff.harness.tolerance", "stepdiff.harness.calibration", "stepdiff.harness.optim",
                  "stepdiff.harness.compare", "stepdiff.harness.diff", "stepdiff.harness.signatures")
"""Also the modules that turn the reference's records into the cached bounds (calibration, tolerance, optim). The
digest covers these and every stepdiff module they import, followed transitively (`source_modules`)."""
IGNORED_RUN_FIELDS = ("timeout_s", "reference_timeout_s")


def enabled_by_default() -> bool:
    return os.environ.get("STEPDIFF_NO_CACHE", "") in ("", "0")


def cache_dir() -> Path:
    """`<STEPDIFF_CACHE>/reference`, or STEPDIFF_REFCACHE when set."""
    if os.environ.get("STEPDIFF_REFCACHE"):
        return Path(os.environ["STEPDIFF_REFCACHE"])
    from .envs import cache_root

    return cache_root() / "reference"


def _source_files(module: str) -> list[Path]:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return []
    origin = Path(spec.origin)
    if spec.submodule_search_locations:  # a package: every module in it
        return sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.py"))
    return [origin]


@functools.cache
def _find(name: str) -> importlib.machinery.ModuleSpec | None:
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # `name` is an attribute of a module, not a module
        return None


def _is_module(name: str) -> bool:
    parent, _, last = name.rpartition(".")
    spec = _find(parent)
    if spec is None or not spec.submodule_search_locations:
        return False  # a name inside a module, not a module
    return any((Path(loc) / f"{last}.py").exists() or (Path(loc) / last / "__init__.py").exists()
               for loc in spec.submodule_search_locations)


_IMPORT = re.compile(r"^[ \t]*(?:import[ \t]+(stepdiff[\w.]*)|from[ \t]+(\.+[\w.]*|stepdiff[\w.]*)[ \t]+import[ \t]+"
                     r"(\([^)]*\)|[^\n]*))", re.M)


def _imports(path: Path, package: str) -> set[str]:
    """The stepdiff modules a source file imports, anywhere in it (a function's lazy import counts too). A text
    scan, not a parse (a parse of every file costs a noticeable part of a second per command): an import-looking
    line inside a string only adds a module to the digest."""
    found: set[str] = set()
    for m in _IMPORT.finditer(path.read_text(errors="replace")):
        if m.group(1):
            found.add(m.group(1))
            continue
        base = m.group(2)
        if base.startswith("."):
            level = len(base) - len(base.lstrip("."))
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - level + 1] + ([base[level:]] if base[level:] else []))
        names = [n.split("#")[0].strip().split(" as ")[0].strip() for n in m.group(3).strip("()").split(",")]
        subs = [f"{base}.{n}" for n in names if n.isidentifier() and _is_module(f"{base}.{n}")]
        if base.split(".")[0] == "stepdiff":
            found.update(subs if subs and len(subs) == len([n for n in names if n]) else [base, *subs])
    return {f for f in found if _find(f) is not None}


def _package_of(module: str, path: Path) -> str:
    """The package relative imports in `path` (a source file of `module`) resolve against."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return module.rpartition(".")[0]
    for loc in spec.submodule_search_locations:  # a package hashed whole: the file's own sub-package
        if path.is_relative_to(loc):
            return ".".join([module, *path.relative_to(loc).parts[:-1]])
    return module


def source_modules() -> dict[str, list[Path]]:
    """SOURCE_MODULES and every stepdiff module they import, transitively: module -> its source files."""
    todo, files = list(SOURCE_MODULES), {}
    while todo:
        module = todo.pop()
        if module in files:
            continue
        files[module] = _source_files(module)
        for path in files[module]:
            todo.extend(_imports(path, _package_of(module, path)))
    return files


_SOURCE_DIGEST: str | None = None


def source_digest() -> str:
    """SHA-256 over the source of the modules that compute the reference and everything of stepdiff they import
    (computed once per process)."""
    global _SOURCE_DIGEST
    if _SOURCE_DIGEST is None:
        h = hashlib.sha256()
        for module, paths in sorted(source_modules().items()):
            for path in paths:
                h.update(module.encode() + b"\0" + path.name.encode() + b"\0")
                h.update(path.read_bytes())
        _SOURCE_DIGEST = h.hexdigest()[:16]
    return _SOURCE_DIGEST


def reference_fields(spec: Spec) -> dict[str, Any]:
    """The spec's fields the reference reads (everything but the case's names, the timeout and framework knobs)."""
    raw = to_dict(spec)
    raw.pop("case", None)
    raw.pop("knobs", None)
    for name in IGNORED_RUN_FIELDS:
        raw.get("run", {}).pop(name, None)
    return dict(raw)


def key_material(spec: Spec, options: dict[str, Any] | None = None) -> dict[str, Any]:
    from stepdiff import __version__

    from .envs import host_environment

    return {"format": CACHE_FORMAT, "spec": reference_fields(spec), "options": dict(sorted((options or {}).items())),
            "host": host_environment().versions, "python": list(sys.version_info[:2]),
            "stepdiff": __version__, "source": source_digest()}


def key_of(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Entry:
    """A verified cache entry: the record directory and the small values stored with it."""

    key: str
    path: Path
    values: dict[str, Any]


class CorruptEntry(Exception):
    pass


class ReferenceCache:
    """The reference-result cache. `enabled=False` neither reads nor writes (`--no-cache`)."""

    def __init__(self, root: Path | None = None, enabled: bool | None = None,
                 log: Any = None) -> None:
        self.root = Path(root) if root is not None else cache_dir()
        self.enabled = enabled_by_default() if enabled is None else enabled
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.hits = self.misses = self.corrupt = 0

    def path_of(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, material: dict[str, Any]) -> Entry | None:
        """The verified entry for `material`, or None (missing, disabled, or corrupt: a corrupt one is removed)."""
        if not self.enabled:
            return None
        key = key_of(material)
        d = self.path_of(key)
        if not d.exists():
            self.misses += 1
            return None
        try:
            values = self._verify(d, material)
        except CorruptEntry as e:
            self.corrupt += 1
            self.misses += 1
            self.log(f"stepdiff: reference cache entry {key} is corrupt ({e}); recomputing it")
            shutil.rmtree(d, ignore_errors=True)
            return None
        self.hits += 1
        try:
            os.utime(d)  # least-recently-used pruning reads the directory's mtime
        except OSError:
            pass
        return Entry(key, d / "record", values)

    def _verify(self, d: Path, material: dict[str, Any]) -> dict[str, Any]:
        try:
            manifest = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise CorruptEntry(f"unreadable manifest: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
            raise CorruptEntry("manifest of another format")
        if manifest.get("material") != json.loads(json.dumps(material, sort_keys=True)):
            raise CorruptEntry("manifest describes another spec")
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise CorruptEntry("manifest lists no files")
        for rel, want in files.items():
            p = d / rel
            if not p.is_file():
                raise CorruptEntry(f"{rel} is missing")
            if p.stat().st_size != want.get("size"):
                raise CorruptEntry(f"{rel} has {p.stat().st_size} bytes, the manifest says {want.get('size')}")
            if _sha256(p) != want.get("sha256"):
                raise CorruptEntry(f"{rel} does not match its SHA-256")
        return dict(manifest.get("values") or {})

    def put(self, material: dict[str, Any], record_dir: Path, values: dict[str, Any] | None = None) -> Path | None:
        """Store a copy of `record_dir` (a saved Record) with `values`; returns the entry, or None when skipped."""
        if not self.enabled:
            return None
        files = sorted(p for p in Path(record_dir).rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in files)
        if not files or size > MAX_ENTRY_BYTES:
            return None
        key = key_of(material)
        final = self.path_of(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
        try:
            manifest_files = {}
            for p in files:
                rel = Path("record") / p.relative_to(record_dir)
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, tmp / rel)
                manifest_files[str(rel)] = {"size": p.stat().st_size, "sha256": _sha256(tmp / rel)}
            manifest = {"format": CACHE_FORMAT, "material": material, "files": manifest_files,
                        "values": values or {}, "created": time.time()}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            try:
                os.rename(tmp, final)  # atomic; fails if another process stored the same entry first
            except OSError:
                return final if final.exists() else None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.prune()
        return final

    def prune(self, max_bytes: int = MAX_TOTAL_BYTES) -> list[str]:
        """Remove least recently used entries until the cache is under `max_bytes`."""
        if not self.root.exists():
            return []
        entries = []
        for d in self.root.glob("*/*"):
            if d.is_dir() and d.name.startswith(".") and time.time() - d.stat().st_mtime > 3600:
                shutil.rmtree(d, ignore_errors=True)  # a write that was interrupted an hour ago or more
                continue
            if d.is_dir() and not d.name.startswith("."):
                size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
                entries.append((d.stat().st_mtime, size, d))
        total = sum(e[1] for e in entries)
        removed = []
        for _, size, d in sorted(entries):
            if total <= max_bytes:
                break
            shutil.rmtree(d, ignore_errors=True)
            total -= size
            removed.append(d.name)
        return removed

    def clear(self) -> int:
        n = sum(1 for d in self.root.glob("*/*") if d.is_dir()) if self.root.exists() else 0
        shutil.rmtree(self.root, ignore_errors=True)
        return n
