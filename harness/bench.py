"""`stepdiff bench`: what stepdiff costs, as ratios measured in one run on one machine.

Every number is a ratio of two things measured in the same run, interleaved round by round so both see the same
machine load (absolute seconds on a shared 2-core box mean little; ratios mean more; the load average before and
after is stored with the results). Results are JSON, stored pytest-benchmark style under
`.benchmarks/<machine>/NNNN_<commit>_<date>.json` and comparable across commits (`--compare`).

Benchmarks (`--only NAME,...`; one function each in stepdiff.harness.bench_suite):
- startup   what each worker spends before its first step: interpreter + imports by package (from -X importtime),
            the adapter's set-up, the first request against the second (the profile that drove the other changes);
- overhead  per adapter: `stepdiff run` of one case, one framework (reference cache off, then on) / the bare scripts
            in benchmarks/bare doing the same framework step and the same reference step by hand, run one after the
            other (target <= 1.0x);
- four      the four-framework SFT case with the reference, one command: cold (fresh workers), warm (the next case in
            the same command) and 1 vs 3 cases (target cold <= 30 s);
- cases     ten cases x one framework in one command / one case (target <= 3x);
- rerun     an unchanged re-run with cached reference results / the first run (target <= 0.6x);
- fuzz      examples per minute, one warm worker pair vs one process per example (target >= 8x);
- scale     wall time and peak memory as the model grows (tiny, ~10M, ~100M parameters) and as frameworks are added;
- engine    the diff engine and the micro-batch weight fit, in parameters per second.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import UsageError

ALL = ("startup", "overhead", "four", "cases", "rerun", "fuzz", "scale", "engine")
FOUR_PINS = ("deepspeed==0.19.8", "openrlhf==0.11.2", "trl==1.16.0", "verl==0.9.1")
DS_PIN = "deepspeed==0.19.8"
DS_CASE = "deepspeed-zero2-offload-ga4"

# One framework step by hand per adapter: the bare script, the bundled case it mirrors, the pin, the scripts' args.
BARE: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "deepspeed": ("deepspeed_step.py", DS_CASE, DS_PIN, ("--grad-accum", "4")),
    "trl": ("trl_step.py", "trl-sft-ga3", "trl==1.16.0", ("--grad-accum", "3")),
}


@dataclass
class Result:
    """One benchmark's outcome: a value (with its unit) from `rounds` measurements, the target, raw numbers."""

    name: str
    group: str
    value: float
    unit: str
    """'x' (a ratio), 's', 'MB', 'examples/min', 'params/s'."""
    target: str = ""
    """e.g. '<= 1.0' (empty: a measurement without a target)."""
    passed: bool | None = None
    data: list[float] = field(default_factory=list)
    """Each round's value; `value` is their median."""
    detail: str = ""
    """One line: what was divided by what."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stats(self) -> dict[str, float]:
        d = self.data or [self.value]
        return {"min": min(d), "max": max(d), "mean": statistics.fmean(d), "median": statistics.median(d),
                "stddev": statistics.stdev(d) if len(d) > 1 else 0.0, "rounds": len(d)}


def check(value: float, target: str) -> bool | None:
    if not target:
        return None
    op, _, num = target.partition(" ")
    x = float(num)
    return value <= x if op == "<=" else value >= x if op == ">=" else None


# ------------------------------------------------------------------------------------------------------------------
# Measuring a command


@dataclass
class Timing:
    wall_s: float
    cpu_s: float
    """User + system CPU of the command and every process it waited for."""
    peak_rss_mb: float
    """The largest resident set of the command or any process it waited for."""
    rc: int
    out: str = ""


def timed(cmd: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None,
          timeout_s: float = 1800) -> Timing:
    """Run a command; wall time, CPU time and peak memory of its whole process tree (os.wait4)."""
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                stdin=subprocess.DEVNULL)
        deadline = t0 + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    return Timing(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, proc.returncode, text)


def stepdiff_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "stepdiff", *args]


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ------------------------------------------------------------------------------------------------------------------
# The bench


class Bench:
    """What every benchmark (stepdiff.harness.bench_suite) measures with: the benchmarks/ folder, rounds, a work
    directory, timed `stepdiff run` commands, derived case files, framework environments, and the results."""

    def __init__(self, root: Path, rounds: int = 3, quick: bool = False, log: Callable[[str], None] | None = None,
                 workdir: Path | None = None) -> None:
        self.root = root
        """The benchmarks/ directory (bare scripts, cases)."""
        self.rounds = max(1, rounds)
        self.quick = quick
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.wd = workdir or Path(tempfile.mkdtemp(prefix="stepdiff-bench-"))
        self.results: list[Result] = []

    def add(self, r: Result) -> Result:
        r.passed = check(r.value, r.target)
        self.results.append(r)
        mark = "" if r.passed is None else (" ok" if r.passed else " MISSED")
        self.log(f"bench: {r.name}: {fmt(r.value, r.unit)}{' (target ' + r.target + ')' if r.target else ''}{mark}"
                 f"  {r.detail}")
        return r

    def env_python(self, pin: str) -> str:
        from .envops import ensure_ops
        from .registry import get_adapter
        from .runner import _environment, parse_pin

        p = parse_pin(pin)
        env = _environment(p)
        ensure_ops(env.path, env.python, env.name, get_adapter(p.name).ops(p.version))
        return env.python

    def run(self, *args: str, env: dict[str, str] | None = None) -> tuple[Timing, dict[str, Any]]:
        """`stepdiff run ... --json` timed; returns the timing and the JSON report."""
        report = self.wd / f"report-{time.monotonic_ns()}.json"
        t = timed(stepdiff_cmd("run", *args, "--json", str(report)), env={**os.environ, **(env or {})})
        if t.rc not in (0, 1) or not report.exists():
            raise RuntimeError(f"stepdiff run {' '.join(args)} exited {t.rc}:\n{t.out[-3000:]}")
        return t, json.loads(report.read_text())

    def case_file(self, base: str | Path, name: str, **fields: Any) -> Path:
        """A case file derived from a bundled case or path, with fields replaced (`section__field=value`)."""
        import tomli_w

        from . import spec as S
        from .cli import resolve_case

        spec = S.load(resolve_case(str(base)))
        spec = spec.replace(case__name=name, **fields)
        raw = S.to_dict(spec)
        raw.update(raw.pop("knobs", {}))
        path = self.wd / "cases" / f"{name}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps(_drop_none(raw)))
        return path


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj


def import_profile(log: str) -> dict[str, float]:
    """Seconds of top-level imports by root package, from `-X importtime` lines in a worker's log."""
    out: dict[str, float] = {}
    for line in log.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line.split("|")
        if len(parts) != 3:
            continue
        name = parts[2]
        if name.startswith("  ") or not name.strip() or name.strip() == "package":
            continue  # nested: counted in its top-level import's cumulative time
        try:
            cumulative_us = int(parts[1])
        except ValueError:
            continue
        root = name.strip().split(".")[0]
        out[root] = out.get(root, 0.0) + cumulative_us / 1e6
    return {k: round(v, 3) for k, v in out.items()}


def fmt(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "params/s":
        return f"{value / 1e6:.1f}M params/s"
    if unit == "s":
        return f"{value:.1f} s"
    if unit == "cpu-s":
        return f"{value:.1f} CPU-s"
    return f"{value:.1f} {unit}"


# ------------------------------------------------------------------------------------------------------------------
# Results: JSON, storage, comparison, table


def machine_info() -> dict[str, Any]:
    import torch

    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"node": platform.node(), "processor": platform.processor() or platform.machine(),
            "machine": platform.machine(), "system": platform.system(), "python_version": platform.python_version(),
            "python_implementation": platform.python_implementation(), "cpu_count": os.cpu_count(),
            "memory_gib": mem, "torch": torch.__version__}


def machine_id() -> str:
    """pytest-benchmark's folder name for a machine: system, implementation, python version, bits."""
    version = ".".join(platform.python_version_tuple()[:2])
    return f"{platform.system()}-{platform.python_implementation()}-{version}-{platform.architecture()[0]}"


def commit_info(cwd: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    sha = git("rev-parse", "HEAD")
    return {"id": sha or None, "branch": git("rev-parse", "--abbrev-ref", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if sha else None,
            "time": git("log", "-1", "--format=%cI") or None}


def document(results: list[Result], info: dict[str, Any]) -> dict[str, Any]:
    from stepdiff import __version__

    return {**info, "version": __version__, "datetime": datetime.now(UTC).isoformat(),
            "benchmarks": [{"name": r.name, "group": r.group, "value": r.value, "unit": r.unit, "target": r.target,
                            "passed": r.passed, "detail": r.detail, "stats": r.stats, "data": r.data,
                            "extra_info": r.extra} for r in results]}


def save(doc: dict[str, Any], storage: Path) -> Path:
    """Store as `<storage>/<machine>/NNNN_<commit>[_dirty]_<date>.json` (pytest-benchmark's layout)."""
    folder = storage / machine_id()
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name[:4]) for p in folder.glob("[0-9][0-9][0-9][0-9]_*.json")]
    commit = (doc.get("commit_info") or {}).get("id") or "nocommit"
    dirty = "_dirty" if (doc.get("commit_info") or {}).get("dirty") else ""
    stamp = datetime.now(UTC).strftime("%Y%m%d_%H%M%S")
    path = folder / f"{max(numbers, default=0) + 1:04d}_{commit[:8]}{dirty}_{stamp}.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def find_saved(storage: Path, which: str | None) -> Path:
    """A stored result: a path, a run number ('0003'), or None for the latest."""
    if which and Path(which).is_file():
        return Path(which)
    folder = storage / machine_id()
    saved = sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.json"))
    if which:
        saved = [p for p in saved if p.name.startswith(which.zfill(4) + "_")]
    if not saved:
        raise UsageError(f"--compare {which or ''}: no stored benchmark results under {folder}; "
                         "run `stepdiff bench` once first (it saves by default)")
    return saved[-1]


def table(results: list[dict[str, Any]], previous: dict[str, Any] | None = None) -> str:
    old = {b["name"]: b for b in (previous or {}).get("benchmarks", [])}
    head = ["benchmark", "value", "target", "met", "rounds"] + (["before", "change"] if previous else []) + ["detail"]
    rows = [head]
    for b in results:
        met = "" if b["passed"] is None else ("yes" if b["passed"] else "NO")
        row = [b["name"], fmt(b["value"], b["unit"]), b["target"] or "-", met or "-", str(b["stats"]["rounds"])]
        if previous:
            o = old.get(b["name"])
            row += [fmt(o["value"], o["unit"]) if o else "-",
                    f"{(b['value'] / o['value'] - 1) * 100:+.0f}%" if o and o["value"] else "-"]
        row.append(b["detail"])
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
        if j == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(lines)


def benchmarks_dir(given: str | None) -> Path:
    """The benchmarks/ folder of a source checkout (bare scripts and cases are not part of the wheel)."""
    if given:
        root = Path(given)
    else:
        from .workers import package_paths

        root = Path(package_paths()["stepdiff.harness"]).parent / "benchmarks"
    if not (root / "bare").is_dir() or not (root / "cases").is_dir():
        raise UsageError(f"--benchmarks {root}: no benchmarks/ folder with bare/ and cases/ there; `stepdiff bench` "
                         "needs a source checkout (git clone + pip install -e .) or --benchmarks DIR")
    return root


def main(only: Sequence[str], rounds: int, quick: bool, benchmarks: str | None, storage: Path, save_results: bool,
         compare_with: str | None, json_path: str | None) -> int:
    unknown = [n for n in only if n not in ALL]
    if unknown:
        raise UsageError(f"--only {','.join(unknown)}: unknown benchmark; known: {', '.join(ALL)}")
    root = benchmarks_dir(benchmarks)
    previous = json.loads(find_saved(storage, compare_with).read_text()) if compare_with is not None else None
    bench = Bench(root, rounds, quick)
    info: dict[str, Any] = {"machine_info": machine_info(), "commit_info": commit_info(root.parent),
                            "load_before": load_avg(), "rounds": rounds, "quick": quick}
    from .bench_suite import BENCHMARKS

    failures = []
    for name in only or ALL:
        bench.log(f"bench: {name} ... (load average {load_avg()})")
        try:
            BENCHMARKS[name](bench)
        except Exception as e:  # one broken benchmark must not lose the others' numbers
            failures.append(f"{name}: {type(e).__name__}: {str(e)[:2000]}")
            bench.log(f"bench: {name} FAILED: {failures[-1]}")
    info["load_after"] = load_avg()
    info["failures"] = failures
    info["self_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    doc = document(bench.results, info)
    print(f"stepdiff bench: {len(bench.results)} results; load average before {info['load_before']}, after "
          f"{info['load_after']} ({info['machine_info']['cpu_count']} CPUs)")
    print(table(doc["benchmarks"], previous))
    if save_results:
        print(f"saved {save(doc, storage)}")
    if json_path:
        Path(json_path).write_text(json.dumps(doc, indent=1))
    for f in failures:
        print(f"FAILED {f}")
    return 2 if failures else 0


__all__ = ["Bench", "Result", "main", "table", "save", "find_saved", "import_profile", "timed", "asdict"]
