"""What the machine itself needs for the bytes ``cmd fit`` moves: the floors its phases are measured against.

Each floor runs in this (fresh) process and prints its seconds, timed inside the process (no
interpreter start-up, no imports), on a warm page cache:

- ``write OUT T N``: the store's bytes (``T × N`` float32) written to the page cache: ``fallocate``,
  then one ``pwrite`` of a reused row buffer per checkpoint (the file is removed afterwards), through
  the calls the ingest makes (``cmdtool._portable``: a seek and a write where there is no ``pwrite``).
- ``read FOLDER``: every ``*.safetensors`` file of the folder read whole with ``readinto`` into
  one reused buffer (no memory map, no parsing).
- ``cast STORE``: one float32 → float64 pass over the store's ``W``, column tile by column tile
  through a memory map, as the fit reads it.

    python benchmarks/floors.py write|read|cast ARGS...
"""

from __future__ import annotations

import glob
import os
import sys
import time

import numpy as np

from cmdtool._portable import allocate, open_fd, write_full


def write_floor(out: str, T: int, N: int) -> float:
    row = np.ones(N, dtype=np.float32)
    start = time.perf_counter()
    fd = open_fd(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        allocate(fd, 0, 4 * T * N)
        for t in range(T):
            write_full(fd, memoryview(row).cast("B"), 4 * t * N)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    os.unlink(out)
    return seconds


def read_floor(folder: str) -> float:
    paths = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    buffer = bytearray(max(os.path.getsize(p) for p in paths))
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            view = memoryview(buffer)
            while (n := f.readinto(view)) > 0:
                view = view[n:]
    return time.perf_counter() - start


def cast_floor(store: str, tile_bytes: int = 32 * 2**20) -> float:
    import h5py

    with h5py.File(store, "r") as f:
        shape, offset = f["W"].shape, f["W"].id.get_offset()
    W = np.memmap(store, dtype="<f4", mode="r", offset=offset, shape=shape)
    tile = max(1, tile_bytes // (8 * shape[0]))
    out = np.empty((shape[0], tile))
    start = time.perf_counter()
    for column in range(0, shape[1], tile):
        block = W[:, column:column + tile]
        np.copyto(out[:, :block.shape[1]], block)
    return time.perf_counter() - start


if __name__ == "__main__":
    kind, args = sys.argv[1], sys.argv[2:]
    if kind == "write":
        seconds = write_floor(args[0], int(args[1]), int(args[2]))
    elif kind == "read":
        seconds = read_floor(args[0])
    elif kind == "cast":
        seconds = cast_floor(args[0])
    else:
        raise SystemExit(__doc__)
    print(f"{seconds:.6f}")
