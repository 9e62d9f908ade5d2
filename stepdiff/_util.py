"""Tiny utilities both rooms share (the harness on the host, the adapters inside a worker).

They live in the top-level `stepdiff` package, not in `stepdiff.harness`, because adapters may import from the harness
only the spec, the record and the data placement (the contracts); everything here is standard library, imports no
framework and no torch, and is importable in every worker environment (workers get the `stepdiff` package path).
"""

from __future__ import annotations

import socket


def version_tuple(version: str) -> tuple[int, ...]:
    """'0.10.3' -> (0, 10, 3); '2.13.0+cpu' -> (2, 13, 0). Each dotted part keeps its leading digits ('1rc2' -> 1,
    'post1' -> 0), so tuples compare the way release numbers do for every release the adapters pin."""
    out = []
    for part in version.split("+")[0].split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        out.append(int(digits) if digits else 0)
    return tuple(out)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a rendezvous / MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
