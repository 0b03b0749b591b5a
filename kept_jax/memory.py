"""How much memory a compiled program needs (XLA's own accounting) and how much a device has free."""

from __future__ import annotations

import os

import jax


def compiled_peak_bytes(compiled) -> int:
    """What a compiled function has live at its peak (XLA's `memory_analysis()`): arguments + fresh outputs +
    temporaries; donated arguments alias their outputs and are counted once."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def free_bytes(device: jax.Device | None = None) -> int | None:
    """Memory the device can still give: an accelerator's limit less what is in use, or for the CPU the host's
    available memory (/proc/meminfo's MemAvailable). None when the platform does not say."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"
