"""Paths that may be local or remote: anything etils.epath opens (a local path, gs://, s3://, ...).

A small module every layer imports (it depends on etils alone). Most code just uses epath; these
helpers are for the places where a library needs a real local file or directory (tokenizers,
memory-mapped safetensors, tensorboardX, appended JSON lines) and for writes that must be whole:
- `is_url` / `is_local`: whether a path names a file of this machine;
- `write_bytes` / `write_text`: replace a file in one step (a temporary file renamed locally; one
  object write on an object store, which replaces objects atomically);
- `copy_file` / `copy_tree`: stream files between any two epath locations;
- `local_dir`: a local directory with a (possibly remote) directory's files, for reading;
- `LocalMirror`: a local directory standing in for a (possibly remote) one, for writing: its new
  and changed files are copied there on `sync()` and when it closes.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str) -> bool:
  """Whether the string `path` is a URL (gs://bucket/x, s3://..., memory://...)."""
  return bool(_URL.match(path))


def is_local(path: epath.PathLike) -> bool:
  """Whether `path` is a file of this machine (not a URL such as gs://bucket/x)."""
  return not is_url(os.fspath(path))


def write_bytes(path: epath.PathLike, data: bytes) -> None:
  """Replace the file at `path` with `data` in one step: a crash leaves the old content or the new.
  Locally through a temporary file, fsynced and renamed; elsewhere as one object write (object
  stores replace an object atomically, and a rename there would be a copy)."""
  path = epath.Path(path)
  if not is_local(path):
    path.write_bytes(data)
    return
  tmp = f"{os.fspath(path)}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_text(path: epath.PathLike, text: str) -> None:
  """`write_bytes` of `text` in UTF-8."""
  write_bytes(path, text.encode("utf-8"))


def copy_file(src: epath.PathLike, dst: epath.PathLike) -> None:
  """Stream the file `src` to `dst` (either may be remote), 1 MiB at a time."""
  with epath.Path(src).open("rb") as fin, epath.Path(dst).open("wb") as fout:
    shutil.copyfileobj(fin, fout, 1 << 20)


def copy_tree(src: epath.PathLike, dst: epath.PathLike, include: tuple[str, ...] = ("*",)) -> list[str]:
  """Copy every file under the directory `src` whose relative path matches one of the glob
  patterns `include` to the same relative path under `dst`. -> the relative paths copied."""
  dst = epath.Path(dst)
  copied = []
  for rel, path in _files(epath.Path(src)):
    if not any(fnmatch.fnmatchcase(rel, p) for p in include):
      continue
    (dst / rel).parent.mkdir(parents=True, exist_ok=True)
    copy_file(path, dst / rel)
    copied.append(rel)
  return copied


def _files(root: epath.Path, prefix: str = "") -> Iterator[tuple[str, epath.Path]]:
  """(relative path, path) of every file under `root`, sorted. By listing each directory: epath's
  recursive glob is refused on GCS and its fsspec walk drops the gs:// of the paths it yields."""
  for child in sorted(root.iterdir()):
    if child.is_dir():
      yield from _files(child, f"{prefix}{child.name}/")
    else:
      yield f"{prefix}{child.name}", child


@contextlib.contextmanager
def local_dir(path: epath.PathLike, include: tuple[str, ...] = ("*",),
              prefix: str = "proxykd-") -> Iterator[str]:
  """A local directory holding the files of the directory `path`: `path` itself when it is local,
  otherwise a temporary copy of its files that match `include` (as in `copy_tree`), removed when
  the block ends. FileNotFoundError if there is no such directory."""
  if not epath.Path(path).is_dir():
    raise FileNotFoundError(f"directory {os.fspath(path)} does not exist")
  if is_local(path):
    yield os.fspath(path)
    return
  tmp = tempfile.mkdtemp(prefix=prefix)
  try:
    copy_tree(path, tmp, include)
    yield tmp
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


class LocalMirror:
  """A local directory, `local`, standing in for the directory `target`.

  When `target` is local, `local` is `target` itself and nothing is ever copied. Otherwise `local`
  is a temporary directory: `sync()` copies its files that are new or changed since the last sync
  (size or modification time) to the same relative paths under `target`, and `close()` syncs and
  removes it, also when a `with` block over it ends with an error. Files are copied whole: meant
  for logs of a training run (JSON lines, TensorBoard events) and small directories, not for large
  artefacts.
  """

  def __init__(self, target: epath.PathLike, prefix: str = "proxykd-"):
    self.target = epath.Path(target)
    self.remote = not is_local(target)
    self.local = tempfile.mkdtemp(prefix=prefix) if self.remote else os.fspath(target)
    os.makedirs(self.local, exist_ok=True)
    self._synced: dict[str, tuple[int, int]] = {}

  def sync(self) -> list[str]:
    """Copy the new and changed files to `target`. -> their relative paths."""
    if not self.remote:
      return []
    copied = []
    for root, _, files in os.walk(self.local):
      for name in sorted(files):
        full = os.path.join(root, name)
        st = os.stat(full)
        rel = os.path.relpath(full, self.local)
        if self._synced.get(rel) == (st.st_size, st.st_mtime_ns):
          continue
        (self.target / rel).parent.mkdir(parents=True, exist_ok=True)
        copy_file(full, self.target / rel)
        self._synced[rel] = (st.st_size, st.st_mtime_ns)
        copied.append(rel)
    return copied

  def close(self) -> None:
    """Sync, then remove the temporary directory. A failed sync keeps it, and the OSError names it."""
    if not self.remote or not os.path.isdir(self.local):
      return
    try:
      self.sync()
    except Exception as e:  # pylint: disable=broad-except  (any backend's error: keep the files, say where)
      raise OSError(f"could not copy {self.local} to {self.target} ({type(e).__name__}: {e}); the "
                    "local copy is kept") from e
    shutil.rmtree(self.local, ignore_errors=True)

  def __enter__(self) -> "LocalMirror":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
