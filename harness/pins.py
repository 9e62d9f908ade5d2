"""Framework pins: 'NAME==VERSION[,PKG SPECIFIER...]' parsed as PEP 508 requirements, from the CLI and case files.

A pin names an adapter and its release, optionally followed by more packages of the same environment (a version set):
`trl==1.16.0,deepspeed==0.18.9`. Every piece is a PEP 508 requirement with a name and a version specifier and nothing
else: options (`--index-url ...`), URLs (`pkg @ https://...`), extras and environment markers are refused, so a case
file can never change where or how an environment is installed from. Commas inside one specifier are kept together
(`transformers>=4.46,<4.50`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError, show_value

HOST_PINNED = ("torch",)
"""Distributions stepdiff pins itself (to the host's exact version) in every environment."""

EXAMPLE = "deepspeed==0.19.8 or trl==1.16.0,deepspeed==0.18.9"


class PinError(UsageError):
    """A pin that is not NAME==VERSION[,PKG SPECIFIER...]."""

    def __init__(self, where: str, pin: str, problem: str, fix: str = f"write e.g. {EXAMPLE}") -> None:
        self.where, self.pin, self.problem, self.fix = where, pin, problem, fix
        super().__init__(f"{where} {show_value(pin)}: {problem}; fix: {fix}")


@dataclass(frozen=True)
class FrameworkPin:
    """One framework run: adapter name, its version, and extra pins of the version set."""

    name: str
    version: str | None
    extra: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return ",".join([f"{self.name}=={self.version}" if self.version else self.name, *self.extra])


def split(text: str) -> list[str]:
    """The pieces of a version set: split on commas, except commas that continue a specifier ('>=1,<2')."""
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if out and piece[:1] in ("<", ">", "=", "!", "~"):
            out[-1] = f"{out[-1]},{piece}"
        else:
            out.append(piece)
    return out


def requirement(text: str, where: str, pin: str) -> tuple[str, str]:
    """(canonical name, specifier) of one piece; anything but a name and a version specifier is a PinError."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    if not text:
        raise PinError(where, pin, "empty pin")
    if text.startswith("-"):
        raise PinError(where, pin, f"{show_value(text)} is an installer option, not a requirement",
                       f"remove it; pins are NAME==VERSION, e.g. {EXAMPLE}")
    if text.rstrip().endswith(("=", "<", ">")):
        raise PinError(where, pin, f"{show_value(text)} has no version after its operator")
    try:
        req = Requirement(text)
    except InvalidRequirement as e:
        first = str(e).splitlines()[0] if str(e) else "invalid"
        raise PinError(where, pin, f"{show_value(text)} is not a PEP 508 requirement ({show_value(first, 80)})"
                       ) from None
    if req.url:
        raise PinError(where, pin, f"{show_value(text)} installs from a URL", "pin a released version instead")
    if req.marker is not None:
        raise PinError(where, pin, f"{show_value(text)} has an environment marker", "remove the '; ...' marker")
    if req.extras:
        raise PinError(where, pin, f"{show_value(text)} asks for extras", "remove the [...] extras")
    for spec in req.specifier:
        if spec.operator == "===":
            raise PinError(where, pin, f"{show_value(text)} uses an arbitrary-equality (===) pin", "use ==VERSION")
    return canonicalize_name(req.name), str(req.specifier)


def parse(text: str, adapters: list[str], where: str = "--framework") -> FrameworkPin:
    """'trl==1.16.0,deepspeed==0.18.9' -> FrameworkPin('trl', '1.16.0', ('deepspeed==0.18.9',)).

    The first piece names the adapter, bare (newest release) or ==VERSION; the others pin more distributions of the
    same environment with any version specifier."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if not isinstance(text, str):
        raise PinError(where, str(text), "expected a string")
    pieces = split(text)
    name, spec = requirement(pieces[0], where, text)
    known = [a for a in adapters if a != "reference"]
    if name not in known:
        raise PinError(where, text, f"unknown framework {name!r}", f"use one of {', '.join(known)}")
    version: str | None = None
    if spec:
        specs = list(SpecifierSet(spec))
        if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            raise PinError(where, text, f"the framework's release must be one exact version, got {show_value(spec)}",
                           f"write {name}==VERSION (or a bare {name} for the newest release)")
        version = specs[0].version
        try:
            Version(version)
        except InvalidVersion:  # pragma: no cover - packaging already refused it
            raise PinError(where, text, f"{version!r} is not a version") from None
    seen = {name}
    extra = []
    for piece in pieces[1:]:
        dist, dist_spec = requirement(piece, where, text)
        if dist in seen:
            raise PinError(where, text, f"{dist} is pinned twice", "pin each distribution once")
        if dist in HOST_PINNED:
            raise PinError(where, text, f"{dist} is pinned by stepdiff to the host's exact version in every "
                           "environment", f"remove the {dist} pin")
        seen.add(dist)
        extra.append(f"{dist}{dist_spec}")
    return FrameworkPin(name, version, tuple(extra))
