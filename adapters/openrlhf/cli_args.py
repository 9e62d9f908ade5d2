"""OpenRLHF's train_sft CLI arguments, in whichever spelling the installed release's parser defines (dotted
`--train.micro_batch_size` from 0.10.2 on, flat `--micro_train_batch_size` up to 0.10.1)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..base import Unsupported

# concept -> candidate option strings, newest spelling first
FLAGS: dict[str, tuple[str, ...]] = {
    "model": ("--model.model_name_or_path", "--pretrain"),
    "dataset": ("--data.dataset", "--dataset"),
    "input_key": ("--data.input_key", "--input_key"),
    "output_key": ("--data.output_key", "--output_key"),
    "input_template": ("--data.input_template", "--input_template"),
    "max_len": ("--data.max_len", "--max_len"),
    "micro_batch": ("--train.micro_batch_size", "--micro_train_batch_size"),
    "batch": ("--train.batch_size", "--train_batch_size"),
    "epochs": ("--train.max_epochs", "--max_epochs"),
    "seed": ("--train.seed", "--seed"),
    "zero_stage": ("--ds.zero_stage", "--zero_stage"),
    "adam_offload": ("--ds.adam_offload", "--adam_offload"),
    "param_dtype": ("--ds.param_dtype", "--param_dtype"),
    "bf16_flag": ("--bf16",),
    "attn": ("--ds.attn_implementation", "--attn_implementation"),
    "flash_attn_flag": ("--flash_attn",),
    "overlap_comm": ("--ds.overlap_comm", "--overlap_comm"),
    "lr": ("--adam.lr", "--learning_rate"),
    "betas": ("--adam.betas", "--adam_betas"),
    "eps": ("--adam.eps",),
    "weight_decay": ("--adam.weight_decay", "--l2"),
    "optim": ("--optim",),
    "scheduler": ("--lr_scheduler",),
    "warmup": ("--lr_warmup_ratio",),
    "max_norm": ("--max_norm",),
    "output_dir": ("--ckpt.output_dir", "--save_path"),
    "ckpt_path": ("--ckpt.path", "--ckpt_path"),
    "save_steps": ("--ckpt.save_steps", "--save_steps"),
    "save_hf": ("--ckpt.save_hf", "--save_hf_ckpt"),
    "disable_ds_ckpt": ("--ckpt.disable_ds", "--disable_ds_ckpt"),
    "num_workers": ("--data.dataloader_num_workers", "--dataloader_num_workers"),
    # releases <= 0.6.x always build an eval set from the same file (split 'test' by default, absent in a jsonl):
    # point it at the train split; it is evaluated after the optimizer step, under no_grad, and never trained on
    "eval_split": ("--eval_split",),
}
OPTIONAL = {"eval_split"}  # passed only where the release's parser defines the option


class CliError(Unsupported):
    """The installed release's CLI cannot express a spec field: the run is `unsupported` (exit 4) with this reason."""


def find_flag(options: dict[str, Any], concept: str) -> str | None:
    return next((f for f in FLAGS[concept] if f in options), None)


def build_argv(parser: Any, want: dict[str, Any]) -> tuple[list[str], str]:
    """argv for `parser` (OpenRLHF's train_sft parser) from concept -> value. Returns (argv, dialect).

    Values: None = leave the CLI default, True = a store_true flag, a tuple = several values."""
    options = parser._option_string_actions
    dialect = "dotted" if "--train.micro_batch_size" in options else "flat"
    argv: list[str] = []
    for concept, value in want.items():
        if value is None:
            continue
        if concept == "dtype":
            flag = find_flag(options, "param_dtype")
            if flag is not None:
                action = options[flag]
                if action.choices is not None and value not in action.choices:
                    action.choices = [*action.choices, value]  # fp32 (see PATCHES)
                argv += [flag, value]
            elif find_flag(options, "bf16_flag") is not None:
                if value == "bf16":
                    argv.append("--bf16")
            elif value != "bf16":
                raise CliError(f"this OpenRLHF CLI has no dtype option; cannot run model.dtype={value}")
            continue
        if concept == "attn":
            flag = find_flag(options, "attn")
            if flag is not None:
                argv += [flag, value]
            elif value != "eager":  # older releases: eager unless --flash_attn is given (never given here)
                raise CliError(f"this OpenRLHF CLI has no attention option; it runs eager, not {value}")
            continue
        flag = find_flag(options, concept)
        if flag is None and concept in OPTIONAL:
            continue
        if flag is None:
            raise CliError(f"this OpenRLHF CLI has no option for {concept} ({' / '.join(FLAGS[concept])})")
        if value is True:
            argv.append(flag)
        elif value is False:
            continue
        elif isinstance(value, (tuple, list)):
            argv += [flag, *[str(v) for v in value]]
        else:
            argv += [flag, str(value)]
    return argv, dialect


@contextlib.contextmanager
def cli_arguments(want: dict[str, Any], seen: dict[str, Any]) -> Iterator[None]:
    """During the CLI run, parse_args() parses arguments built from the parser's own option table."""
    import argparse

    original = argparse.ArgumentParser.parse_args

    def parse_args(self: Any, args: Any = None, namespace: Any = None) -> Any:
        if "argv" in seen:  # only the train_sft parser (the first parse) is rewritten
            return original(self, args, namespace)
        argv, dialect = build_argv(self, want)
        seen["argv"], seen["dialect"] = argv, dialect
        return original(self, argv, namespace)

    argparse.ArgumentParser.parse_args = parse_args  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]

