"""The adapter registry: adapters by name as lazy import-path strings (hypothesis-style).

Registering imports nothing. `get_adapter` imports the adapter module (which itself imports its framework only inside
functions), so `import stepdiff` and `stepdiff --help` never import a framework.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    from stepdiff.adapters.base import Adapter


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    adapter: str
    """'module:Class' of the adapter (see stepdiff.adapters.base.Adapter)."""
    knobs: str | None = None
    """'module:Class' of the adapter's knob dataclass, or None when it takes none."""


_REGISTRY: dict[str, AdapterEntry] = {}


def register_adapter(name: str, adapter: str, knobs: str | None = None) -> None:
    """Register an adapter by import path. Raises on a duplicate name."""
    if name in _REGISTRY:
        raise ValueError(f"adapter {name!r} is already registered ({_REGISTRY[name].adapter})")
    if ":" not in adapter or (knobs is not None and ":" not in knobs):
        raise ValueError("import paths are 'module:attribute'")
    _REGISTRY[name] = AdapterEntry(name, adapter, knobs)


def unregister_adapter(name: str) -> None:
    """Remove an adapter (tests use it to register throw-away adapters)."""
    _REGISTRY.pop(name, None)


def adapter_names() -> list[str]:
    return sorted(_REGISTRY)


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def entry(name: str) -> AdapterEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown framework {name!r}; known: {', '.join(adapter_names())}") from None


def get_adapter(name: str) -> type[Adapter]:
    """The adapter class registered under `name`. Raises UsageError on an unknown name."""
    cls = _load(entry(name).adapter)
    if not isinstance(cls, type):
        raise TypeError(f"adapter {name!r}: {entry(name).adapter} is not a class")
    return cls


def knob_class(name: str) -> type | None:
    """The knob dataclass of adapter `name`, or None. Imports only the knob module (no framework)."""
    e = entry(name)
    if e.knobs is None:
        return None
    cls = _load(e.knobs)
    if not isinstance(cls, type):
        raise TypeError(f"adapter {name!r}: knobs {e.knobs} is not a class")
    return cls


@dataclass(frozen=True)
class KnobDoc:
    """One knob of an adapter's knob table, as `stepdiff spec-help` prints it."""

    name: str
    type: str
    default: Any
    doc: str


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def knob_table(name: str) -> list[KnobDoc]:
    """Adapter `name`'s knobs (its `[name]` table in a case file): name, type, default and the one-line doc, read from
    the knob dataclass itself (empty when it takes none)."""
    cls = knob_class(name)
    if cls is None:
        return []
    hints = typing.get_type_hints(cls)
    return [KnobDoc(f.name, _type_name(hints[f.name]), f.default, str(f.metadata.get("doc", "")))
            for f in dataclasses.fields(cls)]


# The built-in adapters. Third-party adapters call register_adapter() the same way.
register_adapter("reference", "stepdiff.adapters.reference:ReferenceAdapter")
register_adapter("faults", "stepdiff.adapters.faults:FaultsAdapter", "stepdiff.adapters.faults:FaultKnobs")
register_adapter("deepspeed", "stepdiff.adapters.deepspeed.adapter:DeepSpeedAdapter",
                 "stepdiff.adapters.deepspeed.knobs:DeepSpeedKnobs")
register_adapter("openrlhf", "stepdiff.adapters.openrlhf.adapter:OpenRLHFAdapter",
                 "stepdiff.adapters.openrlhf.knobs:OpenRLHFKnobs")
register_adapter("trl", "stepdiff.adapters.trl.adapter:TRLAdapter", "stepdiff.adapters.trl.knobs:TRLKnobs")
register_adapter("verl", "stepdiff.adapters.verl.adapter:VerlAdapter", "stepdiff.adapters.verl.knobs:VerlKnobs")
