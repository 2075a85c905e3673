"""The memory this process may use: a container's limit, not the host's.

Inside a container (a Space: 16 GB on CPU Basic) psutil reports the host's memory. The limit is the
cgroup's (v2 `memory.max`, v1 `memory.limit_in_bytes`) or, failing that, the Space's `MEMORY`
variable; what is free is the limit less the container's working set (its usage without the page
cache the kernel can drop), and never more than the host has free.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 writes "no limit" as the largest page-aligned 63-bit value
_UNLIMITED_V1 = 1 << 60
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?)?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}
_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50}


def parse_quantity(text: str) -> int | None:
    """Bytes of a size such as `16Gi`, `15G`, `512Mi` or `17179869184` (None if it is not one)."""
    match = _QUANTITY.match(text or "")
    if not match:
        return None
    number, unit = match.groups()
    unit = (unit or "").lower()
    return int(float(number) * (_BINARY.get(unit) or _UNITS[unit]))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_files() -> tuple[Path, Path, Path, str] | None:
    """(limit, usage, stat, the stat's reclaimable page-cache field) of this cgroup's memory controller."""
    v2 = CGROUP_ROOT / "memory.max"
    if v2.exists():
        return v2, CGROUP_ROOT / "memory.current", CGROUP_ROOT / "memory.stat", "inactive_file"
    v1 = CGROUP_ROOT / "memory"
    if (v1 / "memory.limit_in_bytes").exists():
        return v1 / "memory.limit_in_bytes", v1 / "memory.usage_in_bytes", v1 / "memory.stat", "total_inactive_file"
    return None


def memory_limit() -> int | None:
    """The container's memory limit in bytes (None when nothing limits it)."""
    limits = []
    files = _cgroup_files()
    if files is not None:
        raw = _read(files[0])
        if raw and raw != "max" and raw.isdigit() and int(raw) < _UNLIMITED_V1:
            limits.append(int(raw))
    if (space := parse_quantity(os.environ.get("MEMORY", ""))) is not None:
        limits.append(space)
    return min(limits) if limits else None


def _working_set() -> int | None:
    """The container's usage less the page cache it could drop (as container runtimes count it)."""
    files = _cgroup_files()
    if files is None:
        return None
    usage = _read(files[1])
    if usage is None or not usage.isdigit():
        return None
    reclaimable = 0
    for line in (_read(files[2]) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == files[3] and value.isdigit():
            reclaimable = int(value)
    return max(0, int(usage) - reclaimable)


def memory_total() -> int:
    """What this process's container may hold in all: its limit, else the machine's memory."""
    import psutil

    limit = memory_limit()
    return min(limit, psutil.virtual_memory().total) if limit is not None else psutil.virtual_memory().total


def memory_available() -> int:
    """Bytes a new build may take now: the limit less the working set, and no more than the host has free."""
    import psutil

    host = psutil.virtual_memory().available
    limit = memory_limit()
    if limit is None:
        return host
    used = _working_set()
    if used is None:  # a limit from MEMORY alone: count this process, the only one a Space runs
        used = psutil.Process().memory_info().rss
    return max(0, min(host, limit - used))
