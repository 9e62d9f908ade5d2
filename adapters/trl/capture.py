"""Read-outs of the TRL adapter: what the hooks copy out of one Trainer run (no math is replaced).

- gradients: `trainer.accelerator.clip_grad_norm_` wrapped on the instance; it is called once per optimizer step
  after accumulation (and the DDP all-reduce) and before clipping, with clipping off too (transformers >= 5 computes
  the norm with max_grad_norm=0; older releases get max_grad_norm=1e9, whose clip coefficient clamps to exactly 1.0).
  Under DeepSpeed accelerate runs engine.step() inside the boundary backward, so `DeepSpeedEngine.step` is wrapped
  for the run to copy `safe_get_full_grad` of every parameter before the boundary step;
- loss: the `loss` the Trainer logs (transformers >= 5); transformers 4.x rounds it to 4 decimals, so there the same
  quantity unrounded: the sum of what `Trainer.training_step` returned for the step's micro-batches (what the Trainer
  adds to tr_loss), averaged over ranks as the Trainer does; both are kept in meta.extra ('logged_loss',
  'accumulated_loss') and a disagreement beyond rounding is a warning;
- grad norm: the `grad_norm` the Trainer logs; parameters: a TrainerCallback's on_step_end;
- optimizer state (exp_avg, exp_avg_sq / momentum_buffer, and the step counter): the same callback, from the
  Trainer's optimizer (its torch optimizer inside accelerate's wrapper) or, under DeepSpeed, gathered by
  `readouts.deepspeed_state`; the optimizer that ran, and who built it, goes into the record;
- the micro-batches the trainer fed (`compute_loss`'s inputs), checked against the spec's placement on every rank by
  the trainer module (a reordering is an error, never a silent pass).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from stepdiff._util import version_tuple
from stepdiff.harness import data as D
from stepdiff.harness.record import StepRecord
from stepdiff.harness.spec import Spec

from ..base import Driven, WorkerContext
from ..readouts import (
    deepspeed_grads,
    deepspeed_optimizer,
    deepspeed_state,
    module_grads,
    module_params,
    torch_optimizer_state,
    wrapped,
)

READOUT_CLIP = "clip_grad_norm_ wrapper"
READOUT_DEEPSPEED = "DeepSpeedEngine.step wrapper: safe_get_full_grad before the boundary step"


class Capture:
    """Gradients at the read-out point, the framework's raw per-micro-batch loss contributions (what it accumulates
    into the logged loss), its logs, parameters after each step, and the micro-batches it fed."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.grads: list[dict[str, Any]] = []
        self.params: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []
        self.step_losses: list[float] = []
        self._running = 0.0
        self.micro_inputs: list[dict[str, Any]] = []
        self.num_items: list[Any] = []
        self.readout_calls = 0
        self.excluded: list[int] = []
        self.states: list[tuple[dict[str, Any], int | None]] = []
        self.trainer: Any = None
        self.deepspeed = False
        self.state_keys: tuple[str, ...] = ()

    def callbacks(self) -> list[Any]:
        """TrainerCallbacks: close each step's loss, then copy the parameters; keep the Trainer's own logs."""
        from transformers import TrainerCallback

        cap = self

        class _Close(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                cap.close_step()

        class _Record(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
                cap.params.append(module_params(model))
                cap.states.append(cap.optimizer_state(model))

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
                if logs:
                    cap.logs.append(dict(logs))

        return [_Close(), _Record()]

    def optimizer_state(self, model: Any) -> tuple[dict[str, Any], int | None]:
        """The optimizer's state after this step (every rank: gathering under DeepSpeed is a collective)."""
        t = self.trainer
        if t is None:
            return {}, None
        if self.deepspeed:
            return deepspeed_state(t.model_wrapped, self.state_keys)
        return torch_optimizer_state(t.optimizer, model)

    def optimizer_name(self) -> str:
        """The optimizer that stepped and who built it."""
        t = self.trainer
        if t is None:
            return ""
        if self.deepspeed:
            built = ("built by DeepSpeed from the config's optimizer block, 'auto' values filled by transformers"
                     if "optimizer" in (t.args.deepspeed if isinstance(t.args.deepspeed, dict) else {}) else
                     "created by the Trainer (create_optimizer) and handed to DeepSpeed")
            return deepspeed_optimizer(t.model_wrapped, built)
        inner = getattr(t.optimizer, "optimizer", t.optimizer)
        return (f"{type(inner).__module__}.{type(inner).__name__} (created by the Trainer: create_optimizer from "
                f"TrainingArguments optim={getattr(t.args, 'optim', '?')})")

    def close_step(self) -> None:
        """End of an optimizer step: the summed micro-batch losses, averaged over ranks as the Trainer logs them."""
        import torch
        import torch.distributed as dist

        total = torch.tensor([self._running], dtype=torch.float64)
        if self.ctx.world_size > 1 and dist.is_initialized():
            if dist.get_backend() == "nccl":
                total = total.cuda()
            dist.all_reduce(total)
            total = total / self.ctx.world_size
        self.step_losses.append(float(total.cpu()))
        self._running = 0.0

    def hook(self, trainer: Any, grads_from_clip: bool) -> None:
        """Instance-level wrappers of this trainer (discarded with it): training_step's return, compute_loss's inputs
        and, unless DeepSpeed runs, accelerator.clip_grad_norm_ (gradients after accumulation, before clipping)."""
        orig_step, orig_loss = trainer.training_step, trainer.compute_loss
        self.trainer, self.deepspeed = trainer, not grads_from_clip
        # asked of every rank under DeepSpeed (a collective): only what the optimizer keeps
        self.state_keys = ("exp_avg", "exp_avg_sq") if "adam" in str(getattr(trainer.args, "optim", "")) else ()

        def training_step(*a: Any, **k: Any) -> Any:
            out = orig_step(*a, **k)
            self._running += float(out.detach().float().sum()) if hasattr(out, "detach") else float(out)
            return out

        def compute_loss(model: Any, inputs: Any, *a: Any, **k: Any) -> Any:
            self.micro_inputs.append({key: v.detach().cpu().clone() for key, v in inputs.items()
                                      if hasattr(v, "detach")})
            self.num_items.append(k.get("num_items_in_batch"))
            return orig_loss(model, inputs, *a, **k)

        trainer.training_step, trainer.compute_loss = training_step, compute_loss
        if grads_from_clip:
            acc = trainer.accelerator
            orig_clip = acc.clip_grad_norm_

            def clip_grad_norm_(parameters: Any, max_norm: Any, *a: Any, **k: Any) -> Any:
                params = list(parameters)
                self.readout_calls += 1
                if len(self.grads) == len(self.step_losses):  # once per optimizer step: the first call
                    self.grads.append(module_grads(trainer.model))
                return orig_clip(params, max_norm, *a, **k)

            acc.clip_grad_norm_ = clip_grad_norm_

    @contextlib.contextmanager
    def deepspeed_readout(self) -> Iterator[None]:
        """During the run, DeepSpeedEngine.step copies every parameter's full gradient before a boundary step (after
        accumulation and the ZeRO reduce, before unscale/clip/step; every rank calls it)."""
        from deepspeed.runtime.engine import DeepSpeedEngine

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def step(engine: Any, *a: Any, **k: Any) -> Any:
                if engine.is_gradient_accumulation_boundary():
                    self.grads.append(deepspeed_grads(engine))
                    self.readout_calls += 1
                return original(engine, *a, **k)
            return step

        with wrapped(DeepSpeedEngine, "step", make):
            yield

    def fed(self, spec: Spec, trainer_name: str) -> Iterator[tuple[int, int, list[int], dict[str, Any]]]:
        """(step, micro-batch, the spec's sample indices there, what the trainer fed) on this rank, after checking
        that it fed exactly the spec's number of micro-batches."""
        b = spec.batch
        expected = [(s, m) for s in range(b.steps) for m in range(b.grad_accum)]
        if len(self.micro_inputs) != len(expected):
            raise RuntimeError(f"{trainer_name} ran {len(self.micro_inputs)} micro-batches on rank {self.ctx.rank}; "
                               f"the spec has {len(expected)}")
        for (s, m), inp in zip(expected, self.micro_inputs, strict=True):
            yield s, m, D.micro_batch_indices(spec, s, self.ctx.rank, m), inp


def run_trainer(trainer: Any, cap: Capture, deepspeed: bool) -> None:
    """trainer.train() with the read-outs installed (DeepSpeed's only for the run)."""
    cap.hook(trainer, grads_from_clip=not deepspeed)
    with cap.deepspeed_readout() if deepspeed else contextlib.nullcontext():
        trainer.train()


def finish(spec: Spec, cap: Capture, trainer: Any, notes: list[str], patches: list[str], extra: dict[str, Any],
           code_path: str, targets: dict[str, list[int]]) -> Driven:
    """Check that every step happened once and assemble the steps the trainer took."""
    import transformers
    import trl

    b, ctx = spec.batch, cap.ctx
    step_logs = [lg for lg in cap.logs if "loss" in lg and "train_runtime" not in lg]
    problems = []
    if len(cap.grads) != b.steps:
        problems.append(f"{len(cap.grads)} gradient read-outs for {b.steps} steps")
    if len(cap.params) != b.steps or len(cap.step_losses) != b.steps:
        problems.append(f"{len(cap.params)} parameter read-outs and {len(cap.step_losses)} step ends for "
                        f"{b.steps} steps")
    if len(step_logs) != b.steps:
        problems.append(f"{len(step_logs)} Trainer log lines with a loss for {b.steps} steps")
    if problems:
        raise RuntimeError("TRL did not run the spec's steps: " + "; ".join(problems))
    n_proc = getattr(trainer.accelerator, "num_processes", None)
    if n_proc != ctx.world_size:
        raise RuntimeError(f"accelerate runs {n_proc} processes, the spec's world size is {ctx.world_size}")
    warnings: list[str] = list(notes)
    logged = [float(lg["loss"]) for lg in step_logs]
    for s, (raw, lg) in enumerate(zip(cap.step_losses, logged, strict=True)):
        if abs(raw - lg) > 1e-4 * max(1.0, abs(raw)) + 5e-5:
            warnings.append(f"step {s}: logged loss {lg} differs from the Trainer's accumulated loss {raw}")
    norms = [float(lg["grad_norm"]) if lg.get("grad_norm") is not None else None for lg in step_logs]
    if targets:
        extra["supervised_targets"] = targets
    extra["logged_loss"] = logged
    extra["num_items_in_batch"] = [None if n is None else float(n) for n in cap.num_items]
    extra["average_tokens_across_devices"] = getattr(trainer.args, "average_tokens_across_devices", "absent")
    extra["readout_calls"] = cap.readout_calls
    extra["accelerate_distributed_type"] = str(getattr(trainer.accelerator, "distributed_type", ""))
    extra["accelerate_num_processes"] = n_proc
    extra["model_accepts_loss_kwargs"] = getattr(trainer, "model_accepts_loss_kwargs", "absent")
    # the loss the Trainer logs; transformers < 5 rounds it to 4 decimals, so there the same quantity unrounded (the
    # sum of training_step's returns, mean over ranks: what the Trainer accumulates before rounding)
    rounded = version_tuple(transformers.__version__) < (5,)
    losses = cap.step_losses if rounded else logged
    extra["loss_source"] = ("Trainer tr_loss accumulation (training_step returns), unrounded" if rounded
                            else "Trainer log 'loss'")
    extra["accumulated_loss"] = cap.step_losses
    states = cap.states if len(cap.states) == b.steps else [({}, None)] * b.steps
    steps = [StepRecord(loss=losses[s], grad_norm=norms[s], grads=cap.grads[s], params=cap.params[s],
                        state=states[s][0], opt_step=states[s][1]) for s in range(b.steps)]
    return Driven(steps=steps, framework_version=trl.__version__, code_path=code_path,
                  readout=READOUT_DEEPSPEED if extra.get("ds_config") else READOUT_CLIP, patches=patches,
                  warnings=warnings, extra=extra, optimizer=cap.optimizer_name(),
                  sources={"loss": "framework", "grad_norm": "framework" if any(n is not None for n in norms)
                           else "none", "state": "framework" if any(st for st, _ in states) else "none"})
