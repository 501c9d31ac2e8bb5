"""Minimal, streaming safetensors I/O on numpy memory maps.

Why not `safetensors.numpy`: it cannot represent bfloat16 (most LLM checkpoints) and it reads or
writes whole files. Here a tensor is a zero-copy view into a memory-mapped file, and a file is
written tensor by tensor, so neither direction holds a second copy of the weights in host memory.
The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw little-endian bytes.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
from etils import epath

from proxykd import paths

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsFile:
  """Read-only access to one .safetensors file; `get(name)` is a memory-mapped view."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    with open(self.path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      try:
        header = json.loads(f.read(n))
      except json.JSONDecodeError as e:
        raise ValueError(f"{self.path}: not a safetensors file (bad header: {e})") from None
    self.metadata = header.pop("__metadata__", {}) or {}
    self.header = header
    self._data_start = 8 + n
    self._mmap = None

  def keys(self) -> list[str]:
    return list(self.header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    info = self.header[name]
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start)
    begin, end = info["data_offsets"]
    return self._mmap[begin:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_file(path: epath.PathLike,
               tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
               metadata: dict[str, str] | None = None) -> None:
  """Write tensors given as (name, shape, dtype, produce) — each produced only when written.

  A local file is written beside `path` and renamed into place; any other epath (gs://...) is
  streamed to its object (removed again if writing fails), so no local disk is needed."""
  tensors = list(tensors)
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, shape, dtype, _ in tensors:
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  local = paths.is_local(path)
  target = epath.Path(f"{os.fspath(path)}.tmp" if local else path)
  try:
    with target.open("wb") as f:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
      for name, shape, dtype, produce in tensors:
        array = np.ascontiguousarray(produce(), dtype=dtype)
        if array.shape != tuple(shape):
          raise ValueError(f"tensor {name}: produced shape {array.shape}, declared {tuple(shape)}")
        f.write(array.reshape(-1).view(np.uint8).data)
  except BaseException:
    target.unlink(missing_ok=True)  # An object store may have committed the part written.
    raise
  if local:
    os.replace(target, path)
