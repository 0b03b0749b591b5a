"""One host leads, the others follow: the first process decides what to compute (e.g. lm-eval's requests) and every
process runs the same computation on the same arrays, as a multi-host JAX program must.

The leader calls `lead(name, *arrays)` before each step; each follower sits in `follow(handlers)`, which receives the
step's name and arrays and calls `handlers[name](*arrays)` until the leader calls `release()`. Arrays travel by
`multihost_utils.broadcast_one_to_all` (a collective over the devices): a fixed-size header first, naming the step
and the arrays' shapes and dtypes, then each array. With one process these functions do nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import numpy as np

from kept_jax.errors import KeptError

MAX_ARRAYS, MAX_DIMS, NAME_BYTES = 8, 4, 24
DTYPES = (np.dtype(np.int32), np.dtype(np.float32))  # what JAX carries without x64
RELEASE = "release"
_HEADER = NAME_BYTES + 1 + MAX_ARRAYS * (2 + MAX_DIMS)  # name, array count, then (dtype, ndim, dims) per array


def is_leader() -> bool:
    return jax.process_index() == 0


def _broadcast(value: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(value))


def _header(name: str, arrays: tuple[np.ndarray, ...]) -> np.ndarray:
    encoded = name.encode()
    if len(encoded) > NAME_BYTES or len(arrays) > MAX_ARRAYS:
        raise KeptError(f"lockstep step {name!r} with {len(arrays)} arrays: names of at most {NAME_BYTES} bytes, "
                        f"at most {MAX_ARRAYS} arrays")
    header = np.zeros(_HEADER, np.int32)
    header[:len(encoded)] = list(encoded)
    header[NAME_BYTES] = len(arrays)
    for i, a in enumerate(arrays):
        if a.dtype not in DTYPES or a.ndim > MAX_DIMS:
            raise KeptError(f"lockstep step {name!r}: array {i} is {a.dtype}[{a.ndim} dims]; send "
                            f"{', '.join(map(str, DTYPES))} of at most {MAX_DIMS} dims")
        at = NAME_BYTES + 1 + i * (2 + MAX_DIMS)
        header[at:at + 2 + a.ndim] = [DTYPES.index(a.dtype), a.ndim, *a.shape]
    return header


def _read_header(header: np.ndarray) -> tuple[str, list[tuple[np.dtype, tuple[int, ...]]]]:
    name = bytes(int(c) for c in header[:NAME_BYTES] if c).decode()
    specs = []
    for i in range(int(header[NAME_BYTES])):
        at = NAME_BYTES + 1 + i * (2 + MAX_DIMS)
        dtype, ndim = DTYPES[int(header[at])], int(header[at + 1])
        specs.append((dtype, tuple(int(d) for d in header[at + 2:at + 2 + ndim])))
    return name, specs


def lead(name: str, *arrays: np.ndarray) -> None:
    """On the leader of several processes: tell the followers to run step `name` on these arrays."""
    if jax.process_count() == 1:
        return
    arrays = tuple(np.asarray(a) for a in arrays)
    _broadcast(_header(name, arrays))
    for a in arrays:
        _broadcast(a)


def release() -> None:
    """On the leader: the followers leave `follow`."""
    lead(RELEASE)


def follow(handlers: Mapping[str, Callable[..., object]]) -> None:
    """On a follower: run each step the leader sends until it releases the followers."""
    while True:
        name, specs = _read_header(_broadcast(np.zeros(_HEADER, np.int32)))
        arrays = [_broadcast(np.zeros(shape, dtype)) for dtype, shape in specs]
        if name == RELEASE:
            return
        if name not in handlers:
            raise KeptError(f"the leading process sent step {name!r}, which this process does not know "
                            f"({', '.join(sorted(handlers))}); run the same kept_jax on every host")
        handlers[name](*arrays)
