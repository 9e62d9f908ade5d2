"""Corrupted cached environments are detected against their manifest and rebuilt with a one-line notice, never run
and never reported as a framework failure; cached artefacts are written atomically.

The corrupted environments are hard-linked copies (cp -al) of the shared deepspeed 0.19.8 environment in a private
cache: a test only ever unlinks or replaces files of its copy, never writes into a shared inode.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from stepdiff.harness import envs
from stepdiff.harness import spec as S
from stepdiff.harness.model import write_init_weights

pytestmark = pytest.mark.framework

PIN = ("deepspeed", "0.19.8")


@pytest.fixture(scope="module")
def shared_env() -> envs.Environment:
    return envs.ensure(envs.request_for(*PIN))


@pytest.fixture
def private_copy(shared_env: envs.Environment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("STEPDIFF_CACHE", str(tmp_path / "cache"))
    envs._VERIFIED.clear()
    copy = envs.env_dir(envs.request_for(*PIN))
    copy.parent.mkdir(parents=True)
    subprocess.run(["cp", "-al", str(shared_env.path), str(copy)], check=True)
    return copy


def replace_file(path: Path, data: bytes) -> None:
    """New content under the same name without touching the (shared, hard-linked) inode."""
    path.unlink()
    path.write_bytes(data)


def broken(copy: Path) -> str:
    with pytest.raises(envs.BrokenEnvironment) as e:
        envs.verify(envs.request_for(*PIN), copy)
    envs._VERIFIED.clear()
    return str(e.value)


def test_each_corruption_is_detected_and_named(private_copy: Path) -> None:
    req = envs.request_for(*PIN)
    assert envs.verify(req, private_copy)["versions"]["deepspeed"] == "0.19.8"
    envs._VERIFIED.clear()
    sp = envs.site_packages(private_copy)
    init = sp / "deepspeed" / "__init__.py"
    original = init.read_bytes()
    init.unlink()
    assert broken(private_copy) == "deepspeed: deepspeed/__init__.py is missing"
    init.write_bytes(original)
    replace_file(init, original + b"\n# truncated or appended\n")
    assert broken(private_copy).startswith("deepspeed: deepspeed/__init__.py has ")
    replace_file(init, original)
    marker = private_copy / "env.json"
    saved = marker.read_bytes()
    replace_file(marker, b"{")
    assert broken(private_copy).startswith("env.json unreadable")
    replace_file(marker, saved)
    (private_copy / "bin" / "python").unlink()
    assert broken(private_copy) == "bin/python is missing"


def test_a_broken_environment_is_rebuilt_with_a_notice_and_the_run_agrees(private_copy: Path, tmp_path: Path
                                                                          ) -> None:
    """The DeepSpeed package loses its __init__.py: the run rebuilds the environment (one line) and agrees; it is
    never reported as a DeepSpeed crash."""
    (envs.site_packages(private_copy) / "deepspeed" / "__init__.py").unlink()
    case = tmp_path / "ds.toml"
    case.write_text('[case]\nname = "ds-rebuilt"\n[batch]\ngrad_accum = 2\n')
    out = subprocess.run([sys.executable, "-m", "stepdiff", "run", str(case), "-f", "deepspeed==0.19.8"],
                         capture_output=True, text=True, timeout=1200, env={**os.environ})
    notice = [ln for ln in out.stderr.splitlines() if "is broken" in ln]
    assert notice == ["stepdiff: cached environment deepspeed==0.19.8 is broken (deepspeed: deepspeed/__init__.py is "
                      "missing); rebuilding it"], out.stderr[-2000:]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert (envs.site_packages(private_copy) / "deepspeed" / "__init__.py").exists()
    assert (private_copy / "manifest.json").exists()


def test_an_environment_without_manifest_is_checked_against_the_installers_record(private_copy: Path) -> None:
    (private_copy / "manifest.json").unlink(missing_ok=True)
    (envs.site_packages(private_copy) / "deepspeed" / "__init__.py").unlink()
    assert broken(private_copy) == "deepspeed: deepspeed/__init__.py is missing"
    assert not (private_copy / "manifest.json").exists()  # never record a broken state as the reference


def test_concurrent_initial_weight_writes_never_collide(tmp_path: Path) -> None:
    """Many writers of the same initial weights at once (two runs of one spec): every call returns a complete file
    and no temporary file is left (they used to share one temporary name)."""
    spec = S.from_dict({"case": {"name": "race"}})
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def write() -> None:
        try:
            barrier.wait()
            path = write_init_weights(spec, tmp_path)
            from safetensors.torch import load_file

            assert len(load_file(str(path))) > 10
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_env_json_is_written_atomically(tmp_path: Path) -> None:
    target = tmp_path / "env.json"
    envs.write_atomic(target, json.dumps({"versions": {}}))
    assert json.loads(target.read_text()) == {"versions": {}}
    assert [p.name for p in tmp_path.iterdir()] == ["env.json"]


def test_a_broken_env_json_does_not_break_env_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPDIFF_CACHE", str(tmp_path))
    d = tmp_path / "envs" / "deepspeed-0.19.8-000000000000"
    d.mkdir(parents=True)
    (d / "env.json").write_text("{not json")
    rows = envs.list_envs()
    assert [(r["name"], r["request"]) for r in rows] == [("deepspeed-0.19.8-000000000000", None)]
    shutil.rmtree(d)


def test_a_same_size_rewrite_is_detected_and_an_older_manifest_is_upgraded(private_copy: Path) -> None:
    """A file rewritten with the same size (an edit, a bad copy) changes its modification time, recorded since
    manifest format 2; a format-1 manifest (sizes only, older stepdiff) is still accepted, then upgraded."""
    req = envs.request_for(*PIN)
    path = private_copy / "manifest.json"
    man = json.loads(path.read_text())
    for entry in man["dists"].values():
        entry.pop("mtimes", None)
    man["format"] = 1
    replace_file(path, json.dumps(man).encode())
    assert envs.verify(req, private_copy)["versions"]["deepspeed"] == "0.19.8"
    upgraded = json.loads(path.read_text())
    assert upgraded["format"] == envs.MANIFEST_FORMAT == 2
    assert "deepspeed/__init__.py" in upgraded["dists"]["deepspeed"]["mtimes"]
    assert upgraded["dists"]["deepspeed"]["files"] == man["dists"]["deepspeed"]["files"]  # older readers still read it
    envs._VERIFIED.clear()
    init = envs.site_packages(private_copy) / "deepspeed" / "__init__.py"
    data = init.read_bytes()
    replace_file(init, b"(" + data[1:])  # same size, a syntax error: it used to read as a DeepSpeed crash
    assert broken(private_copy).startswith("deepspeed: deepspeed/__init__.py was rewritten after the build (same "
                                           "size, modified ")


def test_the_installer_dies_with_a_killed_stepdiff(tmp_path: Path) -> None:
    """SIGKILL to stepdiff mid-build: uv must not go on writing into the half-built environment (the next run removes
    and rebuilds that folder). A stand-in installer (sleep) started through envs._run_uv, its parent killed."""
    import signal
    import time

    from stepdiff.harness import procs

    code = ("import os, sys\nfrom stepdiff.harness import envs\nenvs.uv_binary = lambda: '/bin/sleep'\n"
            "envs._run_uv(['300'], dict(os.environ), 'stand-in')\n")
    parent = subprocess.Popen([sys.executable, "-c", code])
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (kids := procs.descendants(parent.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert kids, "the stand-in installer never started"
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while [k for k in kids if procs.start_time(k)] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [k for k in kids if procs.start_time(k)] == [], "the installer outlived a killed stepdiff"
    finally:
        parent.kill()
        for k in kids:
            if procs.start_time(k):
                os.kill(k, signal.SIGKILL)
