"""Peak resident memory of this process, resettable (Linux), for the per-pass and per-task stats."""

from __future__ import annotations

import resource


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of this process's resident memory (Linux >= 4.0; else no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset (or since the process started), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
