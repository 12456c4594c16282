"""This process's resident memory from /proc (Linux): what the memory benchmarks and tests measure."""

from __future__ import annotations


def memory_mb() -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (its high-water mark), in MiB."""
    with open("/proc/self/status") as fh:
        fields = dict(line.split(":", 1) for line in fh)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS, so a later peak is that of the work after this call.

    False where the kernel refuses (then VmHWM still holds the process's earlier peak).
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
