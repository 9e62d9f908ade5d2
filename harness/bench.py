"""`stepdiff bench`: what stepdiff costs, as ratios measured in one run on one machine.

Every number is a ratio of two things measured in the same run, interleaved round by round so both see the same
machine load (absolute seconds on a shared 2-core box mean little; ratios mean more; the load average before and
after is stored with the results). Results are JSON, stored pytest-benchmark style under
`.benchmarks/<machine>/NNNN_<commit>_<date>.json` and comparable across commits (`--compare`).

Benchmarks (`--only NAME,...`):
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
    def __init__(self, root: Path, rounds: int = 3, quick: bool = False, log: Callable[[str], None] | None = None,
                 workdir: Path | None = None) -> None:
        self.root = root
        """The benchmarks/ directory (bare scripts, cases)."""
        self.rounds = max(1, rounds)
        self.quick = quick
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.wd = workdir or Path(tempfile.mkdtemp(prefix="stepdiff-bench-"))
        self.results: list[Result] = []

    # helpers -----------------------------------------------------------------------------------------------

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

    # benchmarks --------------------------------------------------------------------------------------------

    def bench_startup(self) -> None:
        """Per worker: spawn to ready, imports by top-level package, set-up, first vs second request."""
        from .pool import WorkerKey, WorkerPool
        from .runner import _environment, parse_pin, worker_env
        from .spec import load, to_dict

        spec = load(self.root / "cases" / "sft-four.toml")
        from . import envs
        from .model import write_init_weights

        init = write_init_weights(spec, envs.cache_root() / "init")
        targets: list[tuple[str, str, dict[str, str]]] = [("reference", sys.executable, {})]
        for pin in FOUR_PINS[: 1 if self.quick else 4]:
            p = parse_pin(pin)
            self.env_python(pin)
            env = _environment(p)
            targets.append((p.name, env.python, worker_env(env)))
        for name, python, extra in targets:
            with WorkerPool(self.wd / f"startup-{name}") as pool:
                key = WorkerKey(name, python, 1, "cpu", tuple(sorted({**extra, "PYTHONPROFILEIMPORTTIME": "1"}
                                                                     .items())))
                t0 = time.perf_counter()
                pool.warm(key, 600)
                ready = time.perf_counter() - t0
                w = pool.workers()[0]
                pid = w.proc.pid if w.proc else 0
                cpu = [_cpu_s(pid)]
                setup = float((w.dir / "ready.0").read_text() or 0)
                runs = []
                for i in range(2):
                    t1 = time.perf_counter()
                    pool.submit(key, {"spec": to_dict(spec), "init": str(init),
                                      "out": str(self.wd / f"startup-{name}-{i}")}, 600)
                    runs.append(time.perf_counter() - t1)
                    cpu.append(_cpu_s(pid))
                imports = import_profile(w.log.read_text(errors="replace"))
            top = sorted(imports.items(), key=lambda kv: -kv[1])
            ours = imports.get("stepdiff", 0.0)
            shown = ", ".join(f"{k} {v:.1f}" for k, v in top[:4])
            cpu_first, cpu_second = cpu[1] - cpu[0], cpu[2] - cpu[1]
            self.add(Result(f"startup[{name}]", "startup", cpu[0] + cpu_first, "cpu-s",
                            detail=f"CPU to ready {cpu[0]:.1f} s (imports {shown}; stepdiff's own {ours:.2f} s; "
                                   f"adapter set-up {setup:.1f} s wall), first request {cpu_first:.1f} CPU-s, "
                                   f"second {cpu_second:.2f} CPU-s; wall {ready:.1f} + {runs[0]:.1f} + {runs[1]:.1f} s",
                            extra={"spawn_to_ready_s": ready, "setup_s": setup, "first_request_s": runs[0],
                                   "second_request_s": runs[1], "cpu_ready_s": cpu[0], "cpu_first_request_s": cpu_first,
                                   "cpu_second_request_s": cpu_second, "imports_s": dict(top[:12]),
                                   "stepdiff_imports_s": ours}))

    def bench_overhead(self) -> None:
        for adapter, (script, case, pin, bare_args) in BARE.items():
            if self.quick and adapter != "deepspeed":
                continue
            bare = self.root / "bare" / script
            if not bare.exists():
                continue
            fw_python = self.env_python(pin)
            ratios, cached, bare_s, sd_s, sdc_s = [], [], [], [], []
            self.run(case, "-f", pin)  # warm the OS file cache and the reference cache (not measured)
            for _ in range(self.rounds):
                b1 = timed([fw_python, str(bare), *bare_args], cwd=str(bare.parent))
                b2 = timed([sys.executable, str(self.root / "bare" / "reference_step.py"), *bare_args],
                           cwd=str(bare.parent))
                if b1.rc or b2.rc:
                    raise RuntimeError(f"bare scripts failed:\n{b1.out[-2000:]}\n{b2.out[-2000:]}")
                s, _ = self.run(case, "-f", pin, "--no-cache")
                c, _ = self.run(case, "-f", pin)
                base = b1.wall_s + b2.wall_s
                ratios.append(s.wall_s / base)
                cached.append(c.wall_s / base)
                bare_s.append((b1.wall_s, b2.wall_s))
                sd_s.append(s.wall_s)
                sdc_s.append(c.wall_s)
            med = statistics.median
            self.add(Result(f"overhead[{pin}]", "overhead", med(ratios), "x", "<= 1.0", data=ratios,
                            detail=f"stepdiff run {med(sd_s):.1f} s / bare {adapter} {med(b[0] for b in bare_s):.1f} s"
                                   f" + bare reference {med(b[1] for b in bare_s):.1f} s (reference cache off)",
                            extra={"stepdiff_s": sd_s, "bare_s": bare_s}))
            self.add(Result(f"overhead-cached[{pin}]", "overhead", med(cached), "x", "<= 1.0", data=cached,
                            detail=f"stepdiff run {med(sdc_s):.1f} s with the reference cached / the same bare "
                                   "scripts", extra={"stepdiff_s": sdc_s}))

    def bench_four(self) -> None:
        four = self.root / "cases" / "sft-four.toml"
        for pin in FOUR_PINS:
            self.env_python(pin)
        n = 2 if self.quick else 3
        more = [str(self.case_file(four, f"sft-four-{i}", data__seed=1234 + i)) for i in range(1, n)]
        cold, warm, many = [], [], []
        for _ in range(self.rounds):
            t1, rep1 = self.run(str(four), "--no-cache")
            _check_agree(rep1)
            tn, repn = self.run(str(four), *more, "--no-cache")
            cold.append(t1.wall_s)
            warm.append(statistics.median(c["elapsed_s"] for c in repn["cases"][1:]))
            many.append(tn.wall_s / t1.wall_s)
        per_run = {r["label"]: round(r["timings"]["wall_s"], 1) for r in rep1["runs"]}
        self.add(Result("four-frameworks[cold]", "four", statistics.median(cold), "s", "<= 30", data=cold,
                        detail="one SFT case, deepspeed + openrlhf + trl + verl + the reference, one command, "
                               f"fresh workers, reference cache off; per run {per_run}"))
        self.add(Result("four-frameworks[warm]", "four", statistics.median(warm), "s", data=warm,
                        detail="the same case with another data seed, next in the same command (warm workers)"))
        self.add(Result(f"four-frameworks[{n} cases / 1]", "four", statistics.median(many), "x", data=many,
                        detail=f"{n} four-framework cases in one command / one"))

    def bench_cases(self) -> None:
        self.env_python(DS_PIN)
        n = 10
        files = [str(self.case_file(DS_CASE, f"ds-{i}", data__seed=1234 + i)) for i in range(n)]
        ratios, one, ten = [], [], []
        for _ in range(self.rounds):
            t1, _ = self.run(files[0], "-f", DS_PIN, "--no-cache")
            tn, rep = self.run(*files, "-f", DS_PIN, "--no-cache")
            if len(rep["cases"]) != n:
                raise RuntimeError("not every case ran")
            ratios.append(tn.wall_s / t1.wall_s)
            one.append(t1.wall_s)
            ten.append(tn.wall_s)
        self.add(Result(f"cases[{n} x {DS_PIN}]", "cases", statistics.median(ratios), "x", "<= 3.0", data=ratios,
                        detail=f"{n} cases in one command {statistics.median(ten):.1f} s / one case "
                               f"{statistics.median(one):.1f} s (reference cache off)"))

    def bench_rerun(self) -> None:
        """The re-run saves the reference worker (its start-up, float32 and float64 runs). With the reference and the
        framework running concurrently (default --jobs) the reference is off the critical path, so the saving shows
        in CPU time more than in wall time; --jobs 1 (one after the other) shows it in wall time too."""
        self.env_python(DS_PIN)
        for jobs in (None, 1):
            ratios, cpu_ratios, first, second = [], [], [], []
            flags = ("--jobs", str(jobs)) if jobs else ()
            for i in range(self.rounds):
                env = {"STEPDIFF_REFCACHE": str(self.wd / f"refcache-{jobs}-{i}")}  # empty: the first run computes
                t1, _ = self.run(DS_CASE, "-f", DS_PIN, *flags, env=env)
                t2, rep = self.run(DS_CASE, "-f", DS_PIN, *flags, env=env)
                if not rep.get("reference_cached"):
                    raise RuntimeError("the re-run did not use the cached reference")
                ratios.append(t2.wall_s / t1.wall_s)
                cpu_ratios.append(t2.cpu_s / t1.cpu_s)
                first.append(t1.wall_s)
                second.append(t2.wall_s)
            med = statistics.median
            how = "--jobs 1" if jobs else "default --jobs"
            self.add(Result(f"rerun-cached[{DS_PIN}, {how}]", "rerun", med(ratios), "x", "<= 0.6", data=ratios,
                            detail=f"unchanged re-run {med(second):.1f} s (reference from the cache) / first run "
                                   f"{med(first):.1f} s; CPU time {med(cpu_ratios):.2f}x",
                            extra={"cpu_ratio": cpu_ratios, "first_s": first, "second_s": second}))

    def bench_fuzz(self) -> None:
        from .runner import parse_pin
        from .spec import load

        self.env_python(DS_PIN)
        pin = parse_pin(DS_PIN)
        base = load(_bundled(DS_CASE))
        n_warm, n_cold = (6, 2) if self.quick else (12, 3)
        specs = [base.replace(batch__grad_accum=1 + i % 4, batch__micro_batch_size=1 + i % 2, data__seed=i)
                 for i in range(n_warm)]
        from .refcache import ReferenceCache

        Session = _session_class()
        off = ReferenceCache(enabled=False)  # worker reuse alone: every example computes its reference both ways
        warm_rates, cold_rates, ratios = [], [], []
        for r in range(self.rounds):
            t0 = time.perf_counter()
            with Session(pin, self.wd / f"fuzz-warm-{r}", cache=off) as s:
                verdicts = [s.run(x).verdict for x in specs]
            warm = n_warm / (time.perf_counter() - t0) * 60
            t0 = time.perf_counter()
            for i, x in enumerate(specs[:n_cold]):
                with Session(pin, self.wd / f"fuzz-cold-{r}-{i}", cache=off) as s:
                    verdicts.append(s.run(x).verdict)
            cold = n_cold / (time.perf_counter() - t0) * 60
            if any(v != "agree" for v in verdicts):
                raise RuntimeError(f"fuzz examples did not agree: {verdicts}")
            warm_rates.append(warm)
            cold_rates.append(cold)
            ratios.append(warm / cold)
        med = statistics.median
        self.add(Result(f"fuzz[{DS_PIN}]", "fuzz", med(ratios), "x", ">= 8", data=ratios,
                        detail=f"{med(warm_rates):.1f} examples/min with one warm worker pair / "
                               f"{med(cold_rates):.1f} with one process per example",
                        extra={"warm_per_min": warm_rates, "cold_per_min": cold_rates}))

    def bench_scale(self) -> None:
        from . import spec as S
        from .model import parameter_shapes

        self.env_python(DS_PIN)
        sizes = {"tiny": {}, "~10M": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_layers=8,
                                          num_heads=4, num_kv_heads=2),
                 "~100M": dict(vocab_size=16384, hidden_size=768, intermediate_size=2048, num_layers=12,
                               num_heads=12, num_kv_heads=4)}
        if self.quick:
            sizes.pop("~100M")
        for label, shape in sizes.items():
            fields: dict[str, Any] = {f"model__{k}": v for k, v in shape.items()}
            fields.update(batch__grad_accum=2, deepspeed__offload_optimizer="none")
            path = self.case_file(DS_CASE, f"scale-{label.strip('~')}", **fields)
            n_params = sum(_prod(s) for s in parameter_shapes(S.load(path)).values())
            t, rep = self.run(str(path), "-f", DS_PIN, "--no-cache")
            _check_agree(rep)
            self.add(Result(f"scale-model[{label}]", "scale", t.wall_s, "s", data=[t.wall_s],
                            detail=f"{n_params / 1e6:.2f}M parameters, deepspeed + reference: peak memory "
                                   f"{t.peak_rss_mb:.0f} MB (largest process), CPU {t.cpu_s:.0f} s",
                            extra={"params": n_params, "peak_rss_mb": t.peak_rss_mb, "cpu_s": t.cpu_s}))
        four = self.root / "cases" / "sft-four.toml"
        counts = (1, 2) if self.quick else (1, 2, 4)
        for k in counts:
            pins = [a for p in FOUR_PINS[:k] for a in ("-f", p)]
            for p in FOUR_PINS[:k]:
                self.env_python(p)
            t, rep = self.run(str(four), *pins, "--no-cache")
            _check_agree(rep)
            self.add(Result(f"scale-frameworks[{k}]", "scale", t.wall_s, "s", data=[t.wall_s],
                            detail=f"{' + '.join(FOUR_PINS[:k])} + reference: peak memory {t.peak_rss_mb:.0f} MB, "
                                   f"CPU {t.cpu_s:.0f} s", extra={"peak_rss_mb": t.peak_rss_mb, "cpu_s": t.cpu_s}))

    def bench_engine(self) -> None:
        import torch

        from .diff import dict_diff
        from .signatures import fit_weights

        g = torch.Generator().manual_seed(0)
        n_params = 2_000_000 if self.quick else 10_000_000
        names = [f"p{i}" for i in range(8)]
        per = (n_params // len(names) // 64, 64)
        a = {n: torch.randn(per, generator=g) for n in names}
        b = {n: t + 1e-6 * torch.randn(per, generator=g) for n, t in a.items()}
        total = sum(t.numel() for t in a.values())
        rates, cpu_rates = [], []
        for _ in range(self.rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            dict_diff(a, b)
            rates.append(total / (time.perf_counter() - t0))
            cpu_rates.append(total / max(time.process_time() - c0, 1e-9))
        self.add(Result("engine[diff]", "engine", statistics.median(rates), "params/s", data=rates,
                        detail=f"dict_diff of {total / 1e6:.0f}M fp32 parameters (rel, max abs, cosine, per-parameter "
                               f"ranking), wall; {statistics.median(cpu_rates) / 1e6:.0f}M params per CPU-second",
                        extra={"cpu_params_per_s": cpu_rates}))
        contribs = [{n: torch.randn(per, generator=g) for n in names} for _ in range(4)]
        grad = {n: torch.stack([c[n] for c in contribs]).sum(0) for n in names}
        rates, cpu_rates = [], []
        for _ in range(self.rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            fit_weights(grad, contribs, [f"mb {i}" for i in range(4)])
            rates.append(total / (time.perf_counter() - t0))
            cpu_rates.append(total / max(time.process_time() - c0, 1e-9))
        self.add(Result("engine[fit]", "engine", statistics.median(rates), "params/s", data=rates,
                        detail=f"micro-batch weight fit on 4 contributions of {total / 1e6:.0f}M parameters, wall; "
                               f"{statistics.median(cpu_rates) / 1e6:.0f}M params per CPU-second",
                        extra={"cpu_params_per_s": cpu_rates}))


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _bundled(name: str) -> Path:
    from .cli import resolve_case

    return resolve_case(name)


def _session_class() -> Any:
    try:
        from .session import Session  # type: ignore[import-not-found]
    except ImportError:
        from .fuzz import Session  # type: ignore[attr-defined,no-redef]
    return Session


def _check_agree(report: dict[str, Any]) -> None:
    runs = report.get("runs", [])
    bad = [f"{r['label']}: {r['verdict']} ({r['reason'][:200]})" for r in runs if r["verdict"] != "agree"]
    if bad:
        raise RuntimeError("benchmark case did not agree: " + "; ".join(bad))


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
    failures = []
    for name in only or ALL:
        bench.log(f"bench: {name} ... (load average {load_avg()})")
        try:
            getattr(bench, f"bench_{name}")()
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
