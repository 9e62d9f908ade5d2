"""Read-outs of the OpenRLHF adapter: copies of what OpenRLHF and DeepSpeed hold during one CLI run (nothing is
written back). Each recorder is a wrapper around one of their methods, installed with `readouts.wrapped` for the
duration of the run:

- DeepSpeedEngine._take_model_step (knob readout = 'hooks' only): before it (after accumulation and the DP reduce,
  before clipping, which DeepSpeed does inside it) safe_get_full_grad of every parameter; after it the parameters;
- Actor.forward: the token ids each training forward received (the placement check);
- SFTTrainer.save_logs_and_checkpoints: the logged loss / grad norm;
- SFTDataset.__getitem__ (>= 0.7.0) or GPTLMLoss.forward (<= 0.6.x): the supervised targets;
- DeepspeedStrategy.backward: the losses passed to backward;
- deepspeed.initialize: the DeepSpeed config (and, knob adam_impl = 'torch', DeepSpeed's torch_adam switch).
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from typing import Any

from stepdiff.harness import data as D
from stepdiff.harness.spec import Spec

from ..base import Unsupported, WorkerContext
from ..readouts import deepspeed_grads, deepspeed_optimizer, deepspeed_params, deepspeed_state, wrapped


def _plain(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


class Recorder:
    """What one CLI run produced, copied out through method wrappers (see the module docstring)."""

    def __init__(self, spec: Spec, grad_hooks: bool, torch_adam: bool = False) -> None:
        self.spec = spec
        self.grad_hooks = grad_hooks
        self.torch_adam = torch_adam
        self.ds_config: Any = None
        self.optimizer_from_config: bool | None = None
        self.steps: list[dict[str, Any]] = []
        self.optimizer = ""
        self.logs: list[dict[str, Any]] = []
        self.backward_losses: list[float] = []
        self.forward_rows: list[list[list[int]]] = []
        self.items: dict[int, tuple[list[int], list[float]]] = {}
        self.label_rows: list[list[list[int]]] = []

    # ------------------------------------------------------------------------------------------------ the wrappers
    def hooks(self) -> list[Any]:
        """Context managers that install every recorder (enter them all for the CLI run)."""
        import deepspeed
        from deepspeed.runtime.engine import DeepSpeedEngine

        def on(owner: Any, attr: str, wrapper: Callable[..., Any]) -> Any:
            return wrapped(owner, attr, lambda original: lambda *a, **kw: wrapper(original, *a, **kw))

        out = []
        if self.grad_hooks:
            out.append(on(DeepSpeedEngine, "_take_model_step", self._take_model_step))
        out.append(on(importlib.import_module("openrlhf.models.actor").Actor, "forward", self._forward))
        out.append(on(importlib.import_module("openrlhf.trainer.sft_trainer").SFTTrainer, "save_logs_and_checkpoints",
                      self._save_logs))
        loss_cls = getattr(importlib.import_module("openrlhf.models"), "GPTLMLoss", None)
        if loss_cls is not None:
            out.append(on(loss_cls, "forward", self._gpt_loss))
        out.append(on(importlib.import_module("openrlhf.datasets.sft_dataset").SFTDataset, "__getitem__",
                      self._getitem))
        out.append(on(importlib.import_module("openrlhf.utils.deepspeed.deepspeed").DeepspeedStrategy, "backward",
                      self._backward))
        out.append(on(deepspeed, "initialize", self._initialize))
        return out

    def _take_model_step(self, original: Any, engine: Any, *a: Any, **kw: Any) -> Any:
        grads = deepspeed_grads(engine)
        result = original(engine, *a, **kw)
        norm = engine.get_global_grad_norm()
        state, opt_step = deepspeed_state(engine, ("exp_avg", "exp_avg_sq"))  # OpenRLHF builds only Adam(W)
        self.steps.append({"grads": grads, "params": deepspeed_params(engine),
                           "engine_norm": None if norm is None else float(norm), "state": state,
                           "opt_step": opt_step})
        self.optimizer = deepspeed_optimizer(engine, "built by DeepSpeed from OpenRLHF's DeepSpeed config"
                                             if self.optimizer_from_config else "built by OpenRLHF "
                                             "(strategy.create_optimizer) and handed to DeepSpeed")
        return result

    def _forward(self, original: Any, actor: Any, sequences: Any, *a: Any, **kw: Any) -> Any:
        import torch

        if actor.training and torch.is_grad_enabled():
            mask = kw.get("attention_mask")
            if mask is None and len(a) >= 2:
                mask = a[1]
            rows = []
            for i in range(sequences.shape[0]):
                ids = sequences[i] if mask is None else sequences[i][mask[i].bool()]
                rows.append([int(x) for x in ids.tolist()])
            self.forward_rows.append(rows)
        return original(actor, sequences, *a, **kw)

    def _save_logs(self, original: Any, trainer: Any, *a: Any, **kw: Any) -> Any:
        logs = kw.get("logs_dict", a[3] if len(a) > 3 else None)
        self.logs.append({k: _plain(v) for k, v in dict(logs or {}).items()})
        return original(trainer, *a, **kw)

    def _getitem(self, original: Any, dataset: Any, idx: int) -> Any:
        item = original(dataset, idx)
        # (input_ids, attention_mask, loss_mask) from 0.7.0 on; older releases return (prompt_len, ids, mask, info)
        # and build the labels in the trainer (read from GPTLMLoss)
        if isinstance(item, tuple) and len(item) == 3 and getattr(item[2], "shape", None) == item[0].shape:
            ids, loss_mask = item[0], item[2]
            self.items[int(idx)] = ([int(x) for x in ids[0].tolist()], [float(x) for x in loss_mask[0].tolist()])
        return item

    def _gpt_loss(self, original: Any, module: Any, logits: Any, labels: Any, *a: Any, **kw: Any) -> Any:
        import torch

        if torch.is_grad_enabled():  # training micro-steps, not the evaluation
            ignore = getattr(module, "IGNORE_INDEX", -100)
            self.label_rows.append([[t for t in range(1, row.shape[0]) if int(row[t]) != ignore] for row in labels])
        return original(module, logits, labels, *a, **kw)

    def _backward(self, original: Any, strategy: Any, loss: Any, *a: Any, **kw: Any) -> Any:
        self.backward_losses.append(float(loss.detach().float()))
        return original(strategy, loss, *a, **kw)

    def _initialize(self, original: Any, *a: Any, **kw: Any) -> Any:
        cfg = kw.get("config")
        training = kw.get("optimizer") is not None or (isinstance(cfg, dict) and "optimizer" in cfg)
        if isinstance(cfg, dict) and training and self.ds_config is None:  # the training engine
            self.optimizer_from_config = "optimizer" in cfg
            if self.torch_adam and "optimizer" not in cfg:
                raise Unsupported("openrlhf.adam_impl = 'torch': this release builds its optimizer itself "
                                  "(strategy.create_optimizer: FusedAdam / DeepSpeedCPUAdam), not from the DeepSpeed "
                                  "config, so DeepSpeed's torch_adam switch cannot reach it; use adam_impl = "
                                  "'deepspeed'")
            if self.torch_adam:
                cfg = {**cfg, "zero_force_ds_cpu_optimizer": False,
                       "optimizer": {**cfg["optimizer"],
                                     "params": {**cfg["optimizer"].get("params", {}), "torch_adam": True}}}
                kw["config"] = cfg
            self.ds_config = json.loads(json.dumps(cfg, default=str))
        return original(*a, **kw)

    # ------------------------------------------------------------------------------------------------ after the run
    def check_placement(self, rank: int) -> None:
        """Each micro-batch OpenRLHF's model received on this rank must be the spec's, in order."""
        spec, b = self.spec, self.spec.batch
        smp = D.samples(spec)
        expected = [[[*smp[i].prompt, *smp[i].response] for i in D.micro_batch_indices(spec, s, rank, m)]
                    for s in range(b.steps) for m in range(b.grad_accum)]
        got = [sorted(x) for x in self.forward_rows]
        if len(self.forward_rows) != len(expected):
            raise RuntimeError(f"rank {rank}: OpenRLHF ran {len(self.forward_rows)} training forwards, the spec has "
                               f"{len(expected)} micro-batches")
        for k, (g, e) in enumerate(zip(got, expected, strict=True)):
            if g != sorted(e):
                raise RuntimeError(f"rank {rank}: micro-batch {k} OpenRLHF received is not the spec's (data order or "
                                   f"tokenisation differs): got {g[:1]}..., expected {e[:1]}...")

    def supervised_targets(self, rows: list[int], rank: int) -> dict[str, list[int]] | None:
        """{sample index: positions t (in prompt+response) whose token is a supervised target}. OpenRLHF's loss
        uses loss_mask[:, :-1] against the log-prob of token t+1, so mask position i supervises token i + 1.
        Releases <= 0.6.x: the labels GPTLMLoss received (call k = this rank's k-th micro-batch, checked order)."""
        out: dict[str, list[int]] = {}
        for idx, (_ids, mask) in sorted(self.items.items()):
            out[str(rows[idx])] = [i + 1 for i, v in enumerate(mask[:-1]) if v > 0]
        if not out and self.label_rows:
            b = self.spec.batch
            for k, batch_rows in enumerate(self.label_rows[: b.steps * b.grad_accum]):
                idx = D.micro_batch_indices(self.spec, k // b.grad_accum, rank, k % b.grad_accum)
                for i, targets in zip(idx, batch_rows, strict=True):
                    out[str(i)] = targets
        return out or None

    def step_scalars(self, ctx: WorkerContext) -> tuple[list[float], list[float | None], str]:
        import torch

        b = self.spec.batch
        per_step = b.grad_accum
        if len(self.logs) >= b.steps and all("loss_mean" in lg for lg in self.logs[: b.steps]):
            local = [float(lg["loss_mean"]) for lg in self.logs[: b.steps]]
            source = "logged loss_mean, averaged over DP ranks"
        elif len(self.backward_losses) >= b.steps * per_step:
            bl = self.backward_losses
            local = [sum(bl[s * per_step:(s + 1) * per_step]) / per_step for s in range(b.steps)]
            source = "mean of the losses passed to strategy.backward, over micro-steps and DP ranks"
        else:
            local = [math.nan] * b.steps
            source = "none captured"
        t = torch.tensor(local, dtype=torch.float64)
        if torch.distributed.is_initialized() and ctx.world_size > 1:
            torch.distributed.all_reduce(t)
            t /= ctx.world_size
        norms: list[float | None] = []
        # OpenRLHF logs 0 for a grad norm it did not compute (ZeRO-0 without clipping, cpu-recipe note 9): only there
        # is 0 "not reported"; anywhere else a reported 0 is a number to compare, never dropped
        zero_stage = getattr(self.spec.knobs_for("openrlhf"), "zero_stage", None)
        zero_means_none = zero_stage == 0 and not self.spec.optimizer.clip_grad_norm
        for s in range(b.steps):
            v = self.logs[s].get("grad_norm") if s < len(self.logs) else None
            if v is None and s < len(self.steps):
                v = self.steps[s].get("engine_norm")
            norms.append(None if v is None or (zero_means_none and float(v) == 0) else float(v))
        return [float(x) for x in t], norms, source
