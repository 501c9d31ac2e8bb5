"""Files of the `collect` stage on any etils.epath path (local, gs://, ...).

The corpus and failed.jsonl are appended and fsynced, which needs a local file: for a path that is
not local, `local_copies` works on a local copy (downloaded first, so a rerun resumes) and uploads it
when the block ends, also when it ends with an error. A run killed outright loses what it collected
since it started, as far as the remote copy is concerned (the ids it has make a rerun ask again).
Small side files (batches.json, summary.json) are written whole with `write_text`: atomically
through a renamed temporary file when local, as one object write otherwise.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from absl import logging
from etils import epath

from proxykd.paths import copy_file as _copy, is_local, write_text  # pylint: disable=unused-import
from proxykd.errors import UserError


@contextlib.contextmanager
def local_copies(paths: list[epath.PathLike]) -> Iterator[list[str]]:
  """Local file names standing in for `paths`: a local path is itself; any other is a copy in a
  temporary directory, downloaded at entry if it exists and uploaded at exit. If an upload fails,
  the local copy is kept and the UserError names it."""
  paths = [epath.Path(p) for p in paths]
  if all(is_local(p) for p in paths):
    yield [os.fspath(p) for p in paths]
    return
  tmp = tempfile.mkdtemp(prefix="proxykd-collect-")
  local = []
  for k, p in enumerate(paths):
    if is_local(p):
      local.append(os.fspath(p))
      continue
    local.append(os.path.join(tmp, f"{k}-{p.name}"))
    if p.exists():
      _copy(p, epath.Path(local[-1]))
  logging.info("collect: staging %s locally in %s", ", ".join(str(p) for p in paths if not is_local(p)), tmp)
  try:
    yield local
  finally:
    for p, name in zip(paths, local):
      if is_local(p) or not os.path.exists(name):
        continue
      try:
        p.parent.mkdir(parents=True, exist_ok=True)
        _copy(epath.Path(name), p)
      except Exception as e:  # pylint: disable=broad-except  (any backend's error: keep the data, say where)
        raise UserError(f"collect: could not copy {name} to {p} ({type(e).__name__}: {e}); the local copy is "
                        "kept: copy it there yourself before rerunning") from e
    shutil.rmtree(tmp, ignore_errors=True)
