"""A worker process's memory limit: what still slips past the constraint limits (engine/constraint_limits.py), a
runaway compile or a bug, fails the worker's one request (the pool restarts it) instead of the machine.

The limit is the address space (`RLIMIT_AS`), set inside the worker before it loads the model: an allocation past
it fails in that process only (og's constraint compiler, in Rust, aborts on it; the pool sees the death). Without
it, `minItems: 1000000000` in a schema had a worker allocate 22 GB until the kernel's OOM killer stepped in. The
default is three quarters of the machine's physical memory, at least 4 GiB: address space runs ahead of what is
resident (the tiny fixture's worker: 474 MiB of address space for 104 MiB resident, and the C library reserves
64 MiB per thread arena), so a limit near the working set would stop healthy workers. CUDA workers get no limit
by default: the CUDA driver reserves address space far beyond the machine's memory when it starts, and an
address-space limit would stop it from starting; an explicit limit still applies there (the user's choice)."""

from __future__ import annotations

import os
import re

from phi3v_ort.errors import Phi3vError

MIN_DEFAULT = 4 * 2**30
UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def physical_memory() -> int | None:
    """The machine's physical memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def default_limit(device: str) -> int | None:
    """The limit a worker gets unless told otherwise: 3/4 of physical memory (at least 4 GiB) on the CPU, none on
    CUDA (see above)."""
    total = physical_memory()
    if device == "cuda" or not total:
        return None
    return max(total * 3 // 4, MIN_DEFAULT)


def parse_size(text: str, option: str = "--worker-memory-limit") -> int | None:
    """`8G`, `8GiB`, `6000M`, `512m`, a plain byte count; `0` or `none` for no limit."""
    value = text.strip().lower()
    if value in ("0", "none", "off", "unlimited"):
        return None
    m = SIZE.fullmatch(value)
    if not m:
        raise Phi3vError(f"{option} must be a size such as 8G, 6000M or none, got {text[:40]!r}")
    size = int(float(m.group(1)) * UNITS[m.group(2).lower()])
    if size < 256 * 2**20:
        raise Phi3vError(f"{option} {text} is too small for a worker to load a model: give at least 256M "
                         f"(or none)")
    return size


def apply(limit: int | None) -> None:
    """Set this process's address-space limit (lower it only: a limit set from outside stands when smaller)."""
    if limit is None:
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft == resource.RLIM_INFINITY or limit < soft:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def describe(limit: int | None) -> str:
    return "no limit" if limit is None else f"{limit / 2**30:.1f} GiB"
