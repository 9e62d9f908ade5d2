"""The fuzz campaign machinery on the host-side `faults` adapter (no framework environment): a synthetic fault is
found and shrunk to the simplest configuration, written as a case `stepdiff run` reproduces, and replayed first from
the example database next time; unsupported draws are counted apart and a campaign where nothing ran never passes;
--max-time stops the search; the JSON keeps every configuration."""

from __future__ import annotations

import json
from pathlib import Path

from stepdiff.harness import spec as S
from stepdiff.harness import strategies as ST
from stepdiff.harness.cli import main
from stepdiff.harness.fuzz import fuzz
from stepdiff.harness.runner import parse_pin

SMALL = ST.Limits(max_world_size=1, max_grad_accum=2, max_micro_batch=2, max_steps=1, max_response_len=6)


def case(tmp_path: Path, mode: str) -> S.Spec:
    path = tmp_path / f"faults-{mode}.toml"
    path.write_text(f'[case]\nname = "faults-{mode}"\nframeworks = ["faults"]\n[faults]\nmode = "{mode}"\n')
    return S.load(path)


def test_found_shrunk_saved_reproduced_and_replayed_from_the_database(tmp_path: Path) -> None:
    base, db = case(tmp_path, "scale"), tmp_path / "db"
    vary = ["batch.grad_accum", "batch.micro_batch_size", "data.samples", "optimizer.name"]
    first = fuzz(base, parse_pin("faults"), vary=vary, limits=SMALL, examples=3, database=db,
                 save_case=tmp_path / "found.toml", workdir=tmp_path / "w1")
    assert first.failing is not None and first.failing.verdict == "diverge"
    assert first.changed == {"data.samples": {"lengths": [[1, 1]]}}  # the simplest configuration still shows it
    assert first.result is not None and first.result.signature.name == "uniform-scale"
    assert first.reproduced == "diverge (uniform-scale)"
    assert S.load(first.saved_case).knobs_for("faults").mode == "scale"  # the file `stepdiff run` re-ran above
    assert json.loads((tmp_path / "found.report.json").read_text())["runs"][0]["verdict"] == "diverge"
    again = fuzz(base, parse_pin("faults"), vary=vary, limits=SMALL, examples=3, database=db, save_case=False,
                 workdir=tmp_path / "w2")
    assert again.examples[0].failing and again.examples[0].config == first.failing.config  # replayed first


def test_unsupported_draws_never_pass(tmp_path: Path) -> None:
    # the faults adapter has no float64: every draw is unsupported, nothing runs, and the campaign does not agree
    out = tmp_path / "u.json"
    code = main(["fuzz", _write(tmp_path), "--fix", "model.dtype=float64",
                 "--examples", "3", "--no-database", "--json", str(out)])
    assert code == 4
    doc = json.loads(out.read_text())["campaigns"][0]
    assert doc["verdict"] == "unsupported" and doc["runs"] == 0 and doc["counts"]["unsupported"] >= 3
    assert all(e["verdict"] == "unsupported" and "float64" in e["reason"] for e in doc["examples"])


def _write(tmp_path: Path) -> str:
    p = tmp_path / "faults-none.toml"
    p.write_text('[case]\nname = "faults-none"\nframeworks = ["faults"]\n[faults]\nmode = "none"\n')
    return str(p)


def test_clean_campaign_json_and_max_time(tmp_path: Path) -> None:
    c = fuzz(case(tmp_path, "none"), parse_pin("faults"), limits=SMALL, examples=3, database=None,
             workdir=tmp_path / "w", max_time=0.001)
    assert c.failing is None and c.runs == 1 and c.stopped is not None  # one run always, then the clock stops it
    doc = c.to_json()
    assert doc["verdict"] == "agree" and doc["examples"][0]["verdict"] == "agree"
    assert {"batch.grad_accum", "model.dtype", "data.samples"} <= set(doc["examples"][0]["config"])
