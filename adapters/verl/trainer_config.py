"""verl's own hydra config for one of its trainers, composed from the release's `verl/trainer/config` (defaults
included) and then given the spec's values, the way a user's command-line overrides would.

Each value is `required` (it carries the spec's numbers: batch sizes, lr, betas, clipping, dtype, strategy, the
data files) or not (placement and logging: device, resume mode, loggers, dataloader workers). A required key the
release's config does not have is an error naming the key, never dropped: the run would test something else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..base import Unsupported


def compose(config_name: str) -> Any:
    """The release's trainer config (e.g. 'sft_trainer', 'sft_trainer_engine'), as hydra composes it."""
    import verl
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    directory = Path(verl.__file__).parent / "trainer" / "config"
    with initialize_config_dir(config_dir=str(directory), version_base=None):
        return hydra_compose(config_name=config_name)


def has(cfg: Any, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def apply(cfg: Any, required: dict[str, Any], optional: dict[str, Any], notes: list[str]) -> Any:
    """`cfg` with the dotted keys set; returns the config (a new struct-free DictConfig)."""
    from omegaconf import OmegaConf, open_dict

    missing = [k for k in required if not has(cfg, k) and not _new_key_ok(cfg, k)]
    if missing:
        raise Unsupported(f"this verl release's trainer config has no {', '.join(missing)}: it cannot take the "
                          "spec's values there")
    skipped = [k for k in optional if not has(cfg, k)]
    if skipped:
        notes.append(f"trainer config has no {', '.join(skipped)} in this release (placement/logging only; not set)")
    with open_dict(cfg):
        for key, value in {**required, **{k: v for k, v in optional.items() if k not in skipped}}.items():
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


def _new_key_ok(cfg: Any, dotted: str) -> bool:
    """A key its dataclass has but the yaml leaves out (engine.mixed_precision): allowed where the parent exists and
    names a verl config dataclass (`_target_`), which validates it when verl converts the section."""
    parent, _, _ = dotted.rpartition(".")
    return bool(parent) and has(cfg, parent) and has(cfg, f"{parent}._target_")


def to_container(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)
