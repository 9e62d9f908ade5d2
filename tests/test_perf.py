"""Performance machinery, proven on the `faults` self-test adapter (host python, no framework environment): pooled
workers reused across cases and replaced after a crash or a hang (the error staying with its case), the reference and
the framework running concurrently, cached reference results (keyed by what the reference reads, corrupt entries
recomputed), ahead-of-time op builds, and the bench's result files. Timings themselves live in `stepdiff bench`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from stepdiff.harness import spec as S
from stepdiff.harness.pool import WorkerPool
from stepdiff.harness.refcache import ReferenceCache, key_material, key_of
from stepdiff.harness.runner import parse_pin
from stepdiff.harness.schedule import reference_material, run_cases


def faults_spec(name: str, mode: str = "none", seed: int = 1234, timeout_s: float = 120) -> S.Spec:
    return S.from_dict({"case": {"name": name, "frameworks": ["faults"]}, "batch": {"grad_accum": 3},
                        "data": {"seed": seed}, "run": {"timeout_s": timeout_s}, "faults": {"mode": mode}})


FAULTS = [parse_pin("faults")]


# ---- the reference cache -------------------------------------------------------------------------------------


def test_cache_key_covers_what_the_reference_reads_and_nothing_else() -> None:
    base = faults_spec("a")
    key = key_of(key_material(base))
    # what the reference never reads: the case's names and pins, the timeout, framework knobs
    same = base.replace(case__name="b", case__description="x", case__frameworks=("deepspeed==0.19.8",),
                        run__timeout_s=5, run__reference_timeout_s=7, faults={"mode": "crash"})
    assert key_of(key_material(same)) == key
    # what it reads: any model/data/batch/optimizer/loss field, and the request options
    for changed in (base.replace(model__seed=1), base.replace(data__seed=7), base.replace(batch__grad_accum=2),
                    base.replace(optimizer__lr=0.2), base.replace(loss__aggregation="seq-mean-token-mean")):
        assert key_of(key_material(changed)) != key
    assert key_of(key_material(base, {"token_step": 0})) != key
    material = key_material(base)
    assert set(material["host"]) >= {"torch", "transformers"} and material["stepdiff"] and material["source"]


def test_cache_source_digest_follows_the_reference_s_imports(tmp_path: Path) -> None:
    from stepdiff.harness.refcache import SOURCE_MODULES, _imports, source_modules

    # lazy (inside a function), relative, parenthesised and module-as-name imports are all followed
    src = tmp_path / "m.py"
    src.write_text("import os\nfrom stepdiff.harness.spec import (Spec,\n    to_dict)\n\n\ndef f():\n"
                   "    from .sketch import sketch_one\n    from . import data as D, model\n"
                   "    from ..adapters.base import Adapter\n")
    assert _imports(src, "stepdiff.harness") == {"stepdiff.harness.spec", "stepdiff.harness.sketch",
                                                 "stepdiff.harness.data", "stepdiff.harness.model",
                                                 "stepdiff.adapters.base"}
    mods = source_modules()
    assert set(SOURCE_MODULES) <= set(mods)
    # reached only through imports: adapters/reference.py sketches contributions with harness/sketch.py (a lazy
    # import), compare.py isolates optimizers with optsig.py; editing them must invalidate cached records
    assert {"stepdiff.harness.sketch", "stepdiff.harness.optsig"} <= set(mods)
    assert all(files and all(f.exists() for f in files) for files in mods.values())


def _record_dir(tmp_path: Path) -> Path:
    import torch

    from stepdiff.harness.record import Record, RecordMeta, StepRecord

    rec = Record(RecordMeta("reference", "x", "x", "x", "cpu", 1, "float32"),
                 [StepRecord(1.5, 2.0, {"w": torch.ones(3)}, {"w": torch.zeros(3)})])
    rec.save(tmp_path / "rec")
    return tmp_path / "rec"


def test_cache_round_trip_and_every_corruption_is_detected(tmp_path: Path) -> None:
    cache = ReferenceCache(tmp_path / "cache", log=lambda s: None)
    material = key_material(faults_spec("a"))
    assert cache.get(material) is None
    entry_dir = cache.put(material, _record_dir(tmp_path), {"self_error": 1e-7})
    assert entry_dir is not None
    hit = cache.get(material)
    assert hit is not None and hit.values == {"self_error": 1e-7}
    from stepdiff.harness.record import Record

    assert Record.load(hit.path).steps[0].loss == 1.5

    def corrupt(how: str) -> None:
        tensors = entry_dir / "record" / "tensors.safetensors"
        if how == "flip":
            data = bytearray(tensors.read_bytes())
            data[-1] ^= 0xFF
            tensors.write_bytes(bytes(data))
        elif how == "truncate":
            tensors.write_bytes(tensors.read_bytes()[:-4])
        elif how == "manifest":
            (entry_dir / "manifest.json").write_text("{not json")
        elif how == "missing":
            (entry_dir / "record" / "record.json").unlink()
        elif how == "foreign":  # a manifest describing another spec
            m = json.loads((entry_dir / "manifest.json").read_text())
            m["material"]["spec"]["model"]["seed"] = 99
            (entry_dir / "manifest.json").write_text(json.dumps(m))

    for n, how in enumerate(("flip", "truncate", "manifest", "missing", "foreign"), start=1):
        corrupt(how)
        assert cache.get(material) is None, how  # never trusted ...
        assert not entry_dir.exists(), how  # ... and removed, so the next run recomputes and stores it again
        assert cache.corrupt == n
        assert cache.put(material, _record_dir(tmp_path), {"self_error": 1e-7}) == entry_dir
        assert cache.get(material) is not None
    off = ReferenceCache(tmp_path / "cache", enabled=False)
    assert off.get(material) is None and off.put(material, _record_dir(tmp_path)) is None


# ---- pooled, concurrent workers --------------------------------------------------------------------------------


def test_one_worker_serves_every_case_and_a_failed_one_is_replaced(tmp_path: Path) -> None:
    cases = [(faults_spec("ok-1", seed=1), FAULTS), (faults_spec("crash", "crash", seed=2), FAULTS),
             (faults_spec("hang", "hang", seed=3, timeout_s=3), FAULTS), (faults_spec("ok-2", seed=4), FAULTS)]
    with WorkerPool(tmp_path / "pool") as pool:
        results = run_cases(cases, workdir=tmp_path / "run", pool=pool, cache=ReferenceCache(enabled=False),
                            log=lambda s: None)
        started = pool.started
    verdicts = [r.runs[0].verdict for r in results]
    assert verdicts == ["agree", "error", "error", "agree"]
    assert "exited with code 3" in results[1].runs[0].reason  # each error stays with the case that caused it
    assert "timed out after 3 s" in results[2].runs[0].reason
    # one reference worker for all four cases; the faults worker: the first, its replacement after the crash, and
    # another after the hang (a worker that failed never serves again)
    assert started == 4
    fresh = [r.runs[0].timings["fresh_worker"] for r in results]
    assert fresh == [1.0, 0.0, 1.0, 1.0]


def test_reference_and_framework_start_together_unless_jobs_is_one(tmp_path: Path) -> None:
    def spans(jobs: int) -> dict[str, tuple[float, float]]:
        """Each worker's start and its record's write time (its job's end)."""
        with WorkerPool(tmp_path / f"pool{jobs}") as pool:
            run_cases([(faults_spec("a"), FAULTS)], workdir=tmp_path / f"run{jobs}", pool=pool, jobs=jobs,
                      cache=ReferenceCache(enabled=False), log=lambda s: None)
            starts = {d.name.split("-")[0]: t for d, t in pool.start_times.items()}
        case = tmp_path / f"run{jobs}" / "a"
        return {name: (t, (case / name / "record" / "record.json").stat().st_mtime) for name, t in starts.items()}

    # record times, not worker-ready times: a job (run + float64 calibration) takes ~20 s, a wide margin either way
    both = spans(2)
    assert both["faults"][0] < both["reference"][1] and both["reference"][0] < both["faults"][1]  # overlapping
    one = spans(1)
    first, second = sorted(one.values())
    assert second[0] >= first[1]  # one core: the second worker started after the first job's record was in


def test_unchanged_rerun_takes_the_reference_from_the_cache(tmp_path: Path) -> None:
    logs: list[str] = []
    cache = ReferenceCache(tmp_path / "refcache", log=logs.append)
    spec = faults_spec("cached", "drop")  # a divergence: its micro-batch fit needs the cached contributions
    with WorkerPool(tmp_path / "p1") as p1:
        first = run_cases([(spec, FAULTS)], workdir=tmp_path / "r1", pool=p1, cache=cache, log=logs.append)[0]
        assert p1.started == 2
    with WorkerPool(tmp_path / "p2") as p2:
        second = run_cases([(spec, FAULTS)], workdir=tmp_path / "r2", pool=p2, cache=cache, log=logs.append)[0]
        assert p2.started == 1  # no reference worker at all
    assert not first.reference_cached and second.reference_cached
    a, b = first.runs[0], second.runs[0]
    assert a.verdict == b.verdict == "diverge" and a.signature and b.signature
    assert a.signature.name == b.signature.name == "dropped-microbatches"
    assert a.max_rel_grad_error == b.max_rel_grad_error
    assert first.bound == second.bound and first.bound.reference_self_error is not None
    # a corrupt entry is never trusted: recomputed (and stored again)
    entry = cache.path_of(key_of(reference_material(spec)))  # (the token-level fit's reference is cached too)
    tensors = entry / "record" / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-8] + b"\0" * 8)
    with WorkerPool(tmp_path / "p3") as p3:
        third = run_cases([(spec, FAULTS)], workdir=tmp_path / "r3", pool=p3, cache=cache, log=logs.append)[0]
        assert p3.started == 2
    assert not third.reference_cached and third.runs[0].max_rel_grad_error == a.max_rel_grad_error
    assert any("is corrupt" in line for line in logs)
    assert cache.get(reference_material(spec)) is not None


def test_cached_multi_step_reference_starts_its_replay_worker_beside_the_framework(tmp_path: Path) -> None:
    """Later steps are replayed along the framework's own parameters on the reference worker even when the reference
    itself is cached: that worker starts with the framework's, not after the framework's record."""
    cache = ReferenceCache(tmp_path / "refcache", log=lambda s: None)
    spec = faults_spec("two-steps").replace(batch__steps=2)
    with WorkerPool(tmp_path / "p1") as p1:
        first = run_cases([(spec, FAULTS)], workdir=tmp_path / "r1", pool=p1, cache=cache, log=lambda s: None)[0]
    with WorkerPool(tmp_path / "p2") as p2:
        second = run_cases([(spec, FAULTS)], workdir=tmp_path / "r2", pool=p2, jobs=2, cache=cache,
                           log=lambda s: None)[0]
        assert p2.started == 2  # the replay's reference worker
        times = {d.name.split("-")[0]: (t, d) for d, t in p2.start_times.items()}
    assert not first.reference_cached and second.reference_cached
    assert first.runs[0].verdict == second.runs[0].verdict == "agree"
    assert first.runs[0].max_rel_grad_error == second.runs[0].max_rel_grad_error
    faults_ready = (times["faults"][1] / "ready.0").stat().st_mtime
    assert times["reference"][0] < faults_ready  # started while the framework worker was still starting


def test_a_started_reference_worker_has_imported_what_its_requests_use(tmp_path: Path) -> None:
    """Ready means ready to compute: the reference's set-up (run before a worker writes its ready file) imports torch
    and transformers' Llama model (a warmed reference worker otherwise paid ~4 CPU-s of imports inside the replay,
    after the framework's record)."""
    code = ("import sys; from pathlib import Path; from stepdiff.adapters.base import WorkerContext; "
            "from stepdiff.adapters.reference import ReferenceAdapter; "
            "assert 'transformers.models.llama.modeling_llama' not in sys.modules; "
            f"ReferenceAdapter().setup(WorkerContext(0, 1, 0, 'cpu', Path({str(tmp_path)!r}))); "
            "print('torch' in sys.modules, 'transformers.models.llama.modeling_llama' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"]


def test_session_workers_split_the_cores_and_leave_at_once_on_shutdown(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The reference and the framework run at the same time in a fuzz session: each gets its share of the cores
    (two 2-thread OpenMP pools on 2 cores spun against each other, a warm example 0.13 s -> 1.5 s), and on close
    every worker exits by itself (code 0) instead of being killed after the pool's grace."""
    from stepdiff.harness.session import Session

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with Session(FAULTS[0], tmp_path / "s", cache=ReferenceCache(enabled=False)) as s:
        assert s.run(faults_spec("a")).verdict == "agree"
        workers = [slot.worker for slot in s.pool._slots.values() if slot.worker is not None]
        assert sorted(w.adapter for w in workers) == ["faults", "reference"]
        for w in workers:
            assert w.proc is not None
            environ = dict(kv.split("=", 1) for kv in
                           Path(f"/proc/{w.proc.pid}/environ").read_text().split("\0") if "=" in kv)
            assert environ.get("OMP_NUM_THREADS") == "1", w.adapter
        # more cores, wider worlds, a user's own setting
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
        assert dict(s._key("reference", "py", 1, "cpu", {}).env) == {"OMP_NUM_THREADS": "4"}
        assert dict(s._key("faults", "py", 1, "cpu", {}).env) == {"OMP_NUM_THREADS": "4"}
        assert dict(s._key("faults", "py", 2, "cpu", {}).env) == {"OMP_NUM_THREADS": "2"}
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert dict(s._key("faults", "py", 1, "cpu", {}).env) == {}  # the worker inherits the user's 3
    assert [w.proc.returncode for w in workers if w.proc is not None] == [0, 0]


def test_pytest_plugin_session_pool_serves_several_runs(stepdiff_run, stepdiff_pool, monkeypatch,  # type: ignore[no-untyped-def]
                                                         tmp_path: Path) -> None:
    monkeypatch.setenv("STEPDIFF_REFCACHE", str(tmp_path / "refcache"))
    before = stepdiff_pool.started
    case = tmp_path / "case.toml"
    case.write_text('[case]\nname = "plugin"\nframeworks = ["faults"]\n[batch]\ngrad_accum = 2\n')
    assert stepdiff_run(str(case)).verdict == "agree"
    assert stepdiff_run(str(case), data__seed=5).verdict == "agree"
    assert stepdiff_run(str(case), faults={"mode": "scale"}).verdict == "diverge"
    assert stepdiff_pool.started - before <= 2  # the reference and the faults worker, once each


def test_jobs_must_be_positive(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "stepdiff", "run", "deepspeed-zero2-offload-ga4", "--jobs", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3 and "--jobs 0" in out.stderr


# ---- ahead-of-time op builds ---------------------------------------------------------------------------------


class _Op:
    def __init__(self, name: str, code: str) -> None:
        self.name, self.code, self.what = name, code, f"test op {name}"


def test_ops_are_built_once_and_a_failed_build_is_recorded_not_fatal(tmp_path: Path) -> None:
    from stepdiff.harness.envops import built, ensure_ops

    env = tmp_path / "env"
    env.mkdir()
    marker = tmp_path / "count"
    code = (f"import os; p = {str(marker)!r}; n = int(open(p).read()) if os.path.exists(p) else 0; "
            "open(p, 'w').write(str(n + 1)); assert os.environ['TORCH_EXTENSIONS_DIR'].endswith('torch_extensions')")
    good, bad = _Op("good", code), _Op("bad", "raise SystemExit('no compiler')")
    done = ensure_ops(env, sys.executable, "test-env", [good, bad], log=False)
    assert list(done) == ["good"] and marker.read_text() == "1"
    state = built(env)
    assert state["good"]["ok"] and not state["bad"]["ok"] and "no compiler" in str(state["bad"]["error"])
    assert ensure_ops(env, sys.executable, "test-env", [good], log=False) == {}  # cached: not built again
    assert marker.read_text() == "1"
    ensure_ops(env, sys.executable, "test-env", [bad], log=False)  # a failed op is retried next time
    assert not built(env)["bad"]["ok"]


def test_a_stale_torch_build_lock_is_removed_a_live_one_kept(tmp_path: Path) -> None:
    """A killed build leaves torch's FileBaton lock behind and every later build waits on it forever; a recent lock
    (a live holder) is left alone, and the build that cannot take it fails (recorded, not fatal)."""
    from stepdiff.harness.envops import STALE_LOCK_S, built, ensure_ops, extensions_dir

    env = tmp_path / "env"
    lock = extensions_dir(env) / "cpu_adam" / "lock"
    lock.parent.mkdir(parents=True)
    code = (f"from torch.utils.file_baton import FileBaton; b = FileBaton({str(lock)!r}); "
            "assert b.try_acquire(), 'lock held'; b.release()")
    lock.touch()  # live: recent
    ensure_ops(env, sys.executable, "test-env", [_Op("live", code)], log=False)
    assert lock.exists() and not built(env)["live"]["ok"] and "lock held" in str(built(env)["live"]["error"])
    old = time.time() - STALE_LOCK_S - 60
    os.utime(lock, (old, old))  # stale: a killed build's
    assert list(ensure_ops(env, sys.executable, "test-env", [_Op("stale", code)], log=False)) == ["stale"]
    assert not lock.exists() and built(env)["stale"]["ok"]


def test_openrlhf_declares_the_ops_its_run_would_compile() -> None:
    from stepdiff.harness.registry import get_adapter

    cls = get_adapter("openrlhf")
    spec = S.from_dict({"optimizer": {"name": "adamw"}})
    assert [o.name for o in cls.ops("0.11.2", spec)] == ["deepspeed.fused_adam_cpu"]
    offload = spec.replace(openrlhf={"adam_offload": True})
    assert [o.name for o in cls.ops("0.11.2", offload)] == ["deepspeed.cpu_adam"]
    assert cls.ops("0.11.2", spec.replace(openrlhf={"adam_impl": "torch"})) == ()
    assert {o.name for o in cls.ops("0.11.2")} == {"deepspeed.fused_adam_cpu", "deepspeed.cpu_adam"}


# ---- bench result files ----------------------------------------------------------------------------------------


def test_bench_results_are_stored_and_compared(tmp_path: Path) -> None:
    from stepdiff.harness.bench import ALL, Result, check, document, find_saved, import_profile, save, table
    from stepdiff.harness.bench_suite import BENCHMARKS

    assert tuple(BENCHMARKS) == ALL  # --only names and the functions that run them

    assert check(0.9, "<= 1.0") is True and check(1.1, "<= 1.0") is False and check(9, ">= 8") is True
    assert check(1.0, "") is None
    log = ("import time: self [us] | cumulative | imported package\n"
           "import time:       100 |    2000000 | torch\n"
           "import time:        50 |     300000 |   torch._C\n"
           "import time:        10 |      20000 | stepdiff.harness.spec\n"
           "import time:        10 |      10000 | stepdiff.adapters.base\n")
    assert import_profile(log) == {"torch": 2.0, "stepdiff": 0.03}
    r1 = Result("overhead[x]", "overhead", 1.2, "x", "<= 1.0", data=[1.1, 1.2, 1.3])
    r1.passed = check(r1.value, r1.target)
    first = save(document([r1], {"commit_info": {"id": "abcdef123456", "dirty": False}}), tmp_path)
    assert first.name.startswith("0001_abcdef12_")
    r2 = Result("overhead[x]", "overhead", 0.6, "x", "<= 1.0", data=[0.6])
    r2.passed = check(r2.value, r2.target)
    doc = document([r2], {"commit_info": {"id": "0123456789ab", "dirty": True}})
    second = save(doc, tmp_path)
    assert second.name.startswith("0002_01234567_dirty_")
    assert find_saved(tmp_path, None) == second and find_saved(tmp_path, "1") == first
    text = table(doc["benchmarks"], json.loads(first.read_text()))
    assert "0.60x" in text and "1.20x" in text and "-50%" in text and "yes" in text
    stored = json.loads(second.read_text())
    assert stored["benchmarks"][0]["stats"]["median"] == 0.6 and stored["benchmarks"][0]["passed"] is True


def test_bench_engine_runs_and_saves(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-m", "stepdiff", "bench", "--only", "engine", "--quick", "--rounds", "1",
                          "--storage", str(tmp_path), "--json", str(tmp_path / "b.json")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads((tmp_path / "b.json").read_text())
    names = [b["name"] for b in doc["benchmarks"]]
    assert names == ["engine[diff]", "engine[fit]"]
    assert all(b["value"] > 1e5 for b in doc["benchmarks"])  # parameters per second
    assert "engine[diff]" in out.stdout and list(tmp_path.glob("*/0001_*.json"))


def test_py_cpuinfo_runs_once_per_worker_and_every_caller_gets_its_own_copy_of_the_answer(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """DeepSpeed's op builder and DeepSpeedCPUAdam call `from cpuinfo import get_cpu_info` three times per engine, each
    a ~1.1 s subprocess; the memo keeps the first answer (a stand-in module here: the host has no py-cpuinfo)."""
    import types

    from stepdiff.adapters.deepspeed import cpu

    calls: list[int] = []
    fake = types.ModuleType("cpuinfo")

    def get_cpu_info() -> dict:  # type: ignore[type-arg]
        calls.append(1)
        return {"arch": "X86_64", "flags": ["avx2", "fma"], "call": len(calls)}

    fake.get_cpu_info = get_cpu_info  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cpuinfo", fake)
    assert cpu.memoize_cpuinfo() == [cpu.CPUINFO_ONCE] == cpu.memoize_cpuinfo()  # idempotent: wrapped once
    from cpuinfo import get_cpu_info as patched  # type: ignore[import-not-found]

    first = patched()
    first["flags"].append("mutated by a caller")
    again = patched()
    assert calls == [1]
    assert again == {"arch": "X86_64", "flags": ["avx2", "fma"], "call": 1}
    assert cpu.CPUINFO_ONCE in cpu.PATCHES  # listed in `stepdiff list` by every adapter that runs DeepSpeed


def test_profile_dir_gets_one_loadable_cprofile_file_per_worker_request(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import pstats

    monkeypatch.setenv("STEPDIFF_PROFILE_DIR", str(tmp_path / "prof"))
    with WorkerPool(tmp_path / "pool") as pool:
        result = run_cases([(faults_spec("profiled"), FAULTS)], workdir=tmp_path / "run", pool=pool,
                           cache=ReferenceCache(enabled=False), log=lambda s: None)[0]
    assert result.runs[0].verdict == "agree"
    files = sorted(p.name for p in (tmp_path / "prof").iterdir())
    # the framework's one request; the reference's float32 run and its float64 calibration
    assert files == ["faults-req0000-rank0.prof", "reference-req0000-rank0.prof", "reference-req0001-rank0.prof"]
    stats = pstats.Stats(str(tmp_path / "prof" / "faults-req0000-rank0.prof"))
    profiled = {(Path(f).name, name) for f, _, name in stats.stats}  # type: ignore[attr-defined]
    assert ("faults.py", "run") in profiled  # the adapter's own run is inside the profile
