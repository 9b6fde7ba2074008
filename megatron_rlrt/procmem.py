"""This process's resident memory on Linux, for peak-memory measurements on CPU.

Why not ``resource.getrusage(...).ru_maxrss``: Linux carries the parent's high-water RSS across
fork+exec into it, so a rank started from a 1 GB pytest process reports at least 1 GB whatever it
does. ``VmHWM`` in /proc/self/status belongs to this address space, and writing "5" to
/proc/self/clear_refs resets it to the current RSS, so the peak of one block can be read alone.
"""

from __future__ import annotations


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise KeyError(f"/proc/self/status has no field {field!r}")


def rss_bytes() -> int:
    return status_bytes("VmRSS")


def reset_peak() -> int:
    """Reset the high-water mark to the current RSS; returns that RSS (the baseline of the block)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes()


def peak_bytes() -> int:
    """Highest RSS since the process started or since the last :func:`reset_peak`."""
    return status_bytes("VmHWM")
