"""Streaming GGUF writer: tensors are read, converted or quantized and written one at a time.

Each tensor is cut into row chunks that never cross an expert matrix. Worker threads read a chunk
from the source, widen it to f32 and quantize it with ggml straight into the tensor's output
buffer, while the main thread writes the previous tensor: reading, quantizing and writing overlap
and memory stays at about two tensors' output plus one chunk per thread.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from marco_gguf.quantize import ggml

CHUNK_WEIGHTS = 1 << 20  # weights per work item: ~0.1 s of Q4_K, small enough to balance threads

# numpy holders of the raw source dtypes; bf16 is kept as uint16 and widened by a shift
SOURCE_DTYPES = {T.F32: np.dtype(np.float32), T.F16: np.dtype(np.float16), T.BF16: np.dtype(np.uint16)}


class RowSource(Protocol):
    """Rows of one tensor, seen as 2-D [rows, row length], in one of the float source types."""

    dtype: T  # F32, F16 or BF16

    def read(self, first_row: int, n_rows: int, out: np.ndarray | None = None) -> np.ndarray: ...


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its GGUF name, numpy-order shape, where its rows come from, and its type (a new
    type or importance data is a new job: dataclasses.replace)."""

    name: str
    shape: tuple[int, ...]
    source: RowSource
    type: T
    imatrix: np.ndarray | None = None  # [matrices, row length] importance weights, or None

    @property
    def row_len(self) -> int:
        return self.shape[-1]

    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def rows_per_matrix(self) -> int:
        return self.shape[-2] if len(self.shape) >= 2 else 1

    @property
    def nbytes(self) -> int:
        return self.n_rows * ggml.row_size(self.type, self.row_len)

    @property
    def source_nbytes(self) -> int:
        return self.n_rows * self.row_len * SOURCE_DTYPES[self.source.dtype].itemsize


_thread = threading.local()


def thread_buffer(key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A scratch array of the calling thread, reused from chunk to chunk: valid until this thread asks for
    `key` again. A fresh multi-megabyte array per chunk costs page faults every time (glibc hands such
    blocks back to the kernel on free), more than widening or adding its values."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffers = _thread.__dict__.setdefault("buffers", {})
    buf = buffers.get(key)
    if buf is None or buf.nbytes < nbytes:
        buf = buffers[key] = np.empty(nbytes, np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


def to_f32(raw: np.ndarray, dtype: T) -> np.ndarray:
    """Widen raw source rows to f32 (bf16 is the top half of an f32)."""
    if dtype == T.BF16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def chunks(job: TensorJob) -> Iterable[tuple[int, int]]:
    """(first row, row count) work items that never cross an expert matrix boundary."""
    step = max(1, min(job.rows_per_matrix, CHUNK_WEIGHTS // job.row_len))
    for m0 in range(0, job.n_rows, job.rows_per_matrix):
        m1 = min(m0 + job.rows_per_matrix, job.n_rows)
        for r in range(m0, m1, step):
            yield r, min(step, m1 - r)


def _run_chunk(job: TensorJob, out: np.ndarray, first: int, n: int) -> int:
    dst = out[first:first + n]
    if job.type == job.source.dtype:  # same float type: copy the bytes untouched
        job.source.read(first, n, dst.view(SOURCE_DTYPES[job.type]))
        return n * job.row_len
    if job.source.dtype == T.F32:  # f32 sources (LoRA-merged rows) fill this thread's buffer
        rows = job.source.read(first, n, thread_buffer("rows", (n, job.row_len), np.float32))
    else:
        rows = np.ascontiguousarray(to_f32(job.source.read(first, n), job.source.dtype))
    imatrix = None if job.imatrix is None else job.imatrix[first // job.rows_per_matrix]
    if job.type == T.F32:
        dst.view(np.float32)[:] = rows
    else:
        ggml.quantize_into(job.type, rows, dst, imatrix)
    return n * job.row_len


GGUF_FIXED_HEADER = 24  # magic, version, tensor count, key-value count
RECIPE_KEYS_MARGIN = 4096  # the recipe's keys, added after the overhead is measured (model_file.py)


def metadata_writer(arch: str, metadata: Callable[[gguf.GGUFWriter], None]) -> gguf.GGUFWriter:
    """A writer holding a file's key-values: `metadata` adds them, once, here. More keys may follow until
    write_gguf writes the file."""
    w = gguf.GGUFWriter(None, arch)
    metadata(w)
    return w


def overhead_bytes(w: gguf.GGUFWriter, jobs: list[TensorJob]) -> int:
    """Bytes a file takes beyond its tensor data: header, the writer's key-values as gguf-py packs them now,
    tensor directory, alignment padding, and RECIPE_KEYS_MARGIN for keys added later."""
    string = gguf.GGUFValueType.STRING
    kv = sum(len(w._pack_val(key, string, add_vtype=False))
             + len(w._pack_val(v.value, v.type, add_vtype=True, sub_type=v.sub_type))
             for key, v in w.kv_data[0].items())
    # per tensor: its name (u64 length + bytes), u32 dimension count, u64 per dimension, u32 type, u64 offset
    directory = sum(8 + len(j.name.encode()) + 4 + 8 * len(j.shape) + 4 + 8 for j in jobs)
    return GGUF_FIXED_HEADER + kv + directory + len(jobs) * gguf.GGUF_DEFAULT_ALIGNMENT + RECIPE_KEYS_MARGIN


def write_gguf(path: Path, w: gguf.GGUFWriter, jobs: list[TensorJob], threads: int,
               on_progress: Callable[[int], None] = lambda n: None) -> None:
    """Write a GGUF file: the key-values of `w` (metadata_writer), then every job's tensor in order.

    `on_progress` receives the number of source bytes finished after each chunk.
    """
    for job in jobs:
        w.add_tensor_info(job.name, job.shape, np.dtype(np.float32), job.nbytes, raw_dtype=job.type)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    in_flight: deque[tuple[np.ndarray, list[Future]]] = deque()

    def drain(keep: int) -> None:
        while len(in_flight) > keep:
            out, futures = in_flight.popleft()
            for f in futures:
                f.result()
            w.write_tensor_data(out)

    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="quantize")
    try:
        for job in jobs:
            row_bytes = ggml.row_size(job.type, job.row_len)
            out = np.empty((job.n_rows, row_bytes), np.uint8)
            itemsize = SOURCE_DTYPES[job.source.dtype].itemsize
            futures = []
            for first, n in chunks(job):
                fut = pool.submit(_run_chunk, job, out, first, n)
                # a cancelled chunk (another chunk failed: the pool cancels the rest) reports nothing
                fut.add_done_callback(lambda f, k=itemsize: f.cancelled() or f.exception()
                                      or on_progress(f.result() * k))
                futures.append(fut)
            in_flight.append((out, futures))
            drain(keep=1)
        drain(keep=0)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        w.close()
