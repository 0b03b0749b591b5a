"""What every benchmark records with its figures: the machine, the library versions, the date; and a median timer."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import time
from typing import Callable

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def environment() -> dict:
    import jax

    device = jax.devices()[0]
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "safetensors"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "date": datetime.date.today().isoformat(),
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "devices": jax.device_count(),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
    }


def result_path(stem: str, result: dict) -> str:
    """`benchmarks/results/<stem>-<device>-<date>.json` for `result`'s environment."""
    device = result["environment"]["device"].replace(" ", "_").replace("/", "_")
    return os.path.join(RESULTS, f"{stem}-{device}-{result['environment']['date']}.json")


def write_result(stem: str, result: dict) -> str:
    """Writes `benchmarks/results/<stem>-<device>-<date>.json` (atomically) and returns its path."""
    from kept_jax.fileio import atomic_file

    path = result_path(stem, result)
    os.makedirs(RESULTS, exist_ok=True)
    with atomic_file(path) as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return path


def median_seconds(run: Callable[[], object], reps: int) -> tuple[float, list[float]]:
    """Median wall time of `reps` calls of `run` (which must block until its work is done), and all the times."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times
