"""The OpenRLHF model directory each rank writes for itself (host side, no framework environment)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepdiff.harness import spec as S


def test_model_dir_written_on_rank_1_inside_a_process_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pooled world-size-2 worker's second run has a process group; transformers >= 5.1x then writes checkpoints
    on rank 0 only, which left rank 1 a directory with a tokenizer and no model (OpenRLHF 0.11.2 errored)."""
    import torch
    from transformers import PreTrainedModel

    from stepdiff.adapters.openrlhf import fixture
    from stepdiff.harness.model import write_init_weights

    spec = S.from_dict({"case": {"name": "m"}, "openrlhf": {}})
    init = write_init_weights(spec, tmp_path)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
    if hasattr(PreTrainedModel, "should_save_on_this_rank"):  # the transformers behaviour this guards against
        assert not PreTrainedModel.should_save_on_this_rank(object(), True)  # type: ignore[arg-type]
    fixture.write_model_dir(spec, init, tmp_path / "model")
    written = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= written, written
