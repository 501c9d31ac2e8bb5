"""Scalars from TensorBoard event files, read without TensorFlow (tensorboardX's protobufs).

An event file is a sequence of records: an 8-byte little-endian length, a 4-byte CRC of it, the
serialised `Event` protobuf, a 4-byte CRC of that. A record cut short (a run killed while writing)
ends the file's reading. A resumed run writes the steps after its checkpoint again into a newer
file: files are read oldest first (their names start with the creation time) and the last value
written for a (tag, step) wins.
"""
from __future__ import annotations

import os
import struct
from typing import Sequence

from etils import epath

Curves = dict[str, list[tuple[int, float]]]


def _records(data: bytes):
  at = 0
  while at + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[at:at + 8])
    end = at + 12 + length + 4
    if end > len(data):
      return
    yield data[at + 12:at + 12 + length]
    at = end


def read_scalars(logdir: epath.PathLike) -> Curves:
  """{tag: [(step, value), ...] sorted by step} of every scalar in the event files of `logdir`."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  logdir = epath.Path(logdir)
  values: dict[str, dict[int, float]] = {}
  files = sorted(p for p in logdir.iterdir() if "tfevents" in p.name) if logdir.is_dir() else []
  for path in files:
    for blob in _records(path.read_bytes()):
      event = event_pb2.Event()
      try:
        event.ParseFromString(blob)
      except Exception:  # pylint: disable=broad-except  (a corrupt record: skip it)
        continue
      for v in event.summary.value:
        if v.WhichOneof("value") == "simple_value":
          values.setdefault(v.tag, {})[int(event.step)] = float(v.simple_value)
  return {tag: sorted(steps.items()) for tag, steps in sorted(values.items())}


def training_logs(run_dir: epath.PathLike, exclude: Sequence[str] = ()) -> dict[str, Curves]:
  """{stage: curves} of a run: every `tensorboard/` directory up to three levels below the run,
  named by its parent's path relative to the run (`proxy_sft`, `proxy_dpo/rounds/001`, ...); the
  run's own (a run that is one training stage's directory, e.g. DIR/student_sft) is named by the
  directory (`student_sft`). Directories in `exclude` (other runs of the same report) are skipped."""
  run_dir = epath.Path(run_dir)
  skip = {os.path.normpath(os.fspath(p)) for p in exclude}
  out = {}
  frontier = [(run_dir, "")]
  for _ in range(4):
    nxt = []
    for d, rel in frontier:
      if not d.is_dir():
        continue
      for child in sorted(d.iterdir()):
        if not child.is_dir() or os.path.normpath(os.fspath(child)) in skip:
          continue
        if child.name == "tensorboard":
          curves = read_scalars(child)
          if curves:
            out[rel or run_dir.name] = curves
        else:
          nxt.append((child, f"{rel}/{child.name}" if rel else child.name))
    frontier = nxt
  return out


def join_rounds(logs: dict[str, Curves]) -> dict[str, Curves]:
  """DPO rounds (`<stage>/rounds/<k>`) joined into one curve per stage, each round's steps after
  the previous round's last."""
  out: dict[str, Curves] = {}
  offsets: dict[str, int] = {}
  for name in sorted(logs):
    parts = name.split("/")
    if len(parts) == 3 and parts[1] == "rounds":
      stage, base = parts[0], offsets.get(parts[0], 0)
      last = base
      for tag, pts in logs[name].items():
        out.setdefault(stage, {}).setdefault(tag, []).extend((base + s, v) for s, v in pts)
        last = max([last] + [base + s for s, _ in pts])
      offsets[stage] = last
    else:
      out[name] = logs[name]
  return out
