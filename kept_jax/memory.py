"""How much memory a compiled program needs (XLA's own accounting) and how much a device has free."""

from __future__ import annotations

import os
import re

import jax

from kept_jax.errors import KeptError

GIB = 2**30
# Decimal units as Transformers' max_shard_size and GPU data sheets count them (5GB = 5e9 bytes, "80GB" H100),
# binary with an i (80GiB = 80 * 2^30); a bare letter is the decimal unit.
SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
              "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str, flag: str) -> int:
    """A size a user gives (`--device-memory 80GB`, `--max-shard-size 5GiB`, `1024`) in bytes; `flag` names the
    option in the message when the text is not a size."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in SIZE_UNITS:
        raise KeptError(f"{flag} {text!r} is not a size: give one such as 80GB (10^9 bytes), 80GiB (2^30) or "
                        "500MB")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2)])


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
    return f"{nbytes / GIB:.1f} GiB"
