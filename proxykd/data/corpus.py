"""The teacher corpus: one JSON object per line, written by the `collect` stage, read by training.

A record (README "Teacher corpus format" documents the same thing for users):

    {"id": "3f9c0a...",                      # stable: hash(messages, teacher params, sample index)
     "messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
     "response": "Step 1 ...\\n#### 42",        # the teacher's reply (assistant content)
     "sample_index": 0,                       # which of the n samples of this prompt
     "teacher": {"model": "gpt-4o", "temperature": 0.7, "top_p": 1.0, "max_tokens": 512,
                 "seed": null, "stop": null, "top_logprobs": 0},
     "finish_reason": "stop",                 # OpenAI's: stop | length | content_filter | ...
     "usage": {"prompt_tokens": 40, "completion_tokens": 60, "total_tokens": 100},
     "logprobs": null,                        # or per response token, as OpenAI returns them:
                 # [{"token": "Step", "logprob": -0.01, "top_logprobs": [{"token": "Step", "logprob": -0.01}, ...]}]
     "meta": {"source": "gsm8k:train", "index": 12, "answer": "72"}}   # optional, free-form

`corpus.jsonl` holds successful records only. Requests that failed for good (a permanent 4xx, or
retries exhausted) go to the side file `failed.jsonl` next to it, one object per line with the same
`id`, `messages`, `sample_index`, `teacher` and `meta` plus `status: "failed"` and `error`
({"status_code", "type", "message"}); a resumed collection tries them again.

Durability: `CorpusWriter` appends whole lines and flushes + fsyncs every `sync_every` records and on
close, so a crash loses at most the last unsynced batch and leaves at most one torn (unterminated)
last line. Readers drop such a torn last line (with a warning); the writer truncates it before
appending. Every other malformed line is an error naming the file and line number.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypedDict

from absl import logging
from etils import epath

from proxykd.errors import UserError

CORPUS_FILENAME = "corpus.jsonl"
FAILED_FILENAME = "failed.jsonl"
# Teacher sampling parameters that enter a record's id (the model name included).
ID_PARAMS = ("model", "temperature", "top_p", "max_tokens", "seed", "stop", "top_logprobs")
_ROLES = ("system", "user", "assistant", "developer", "tool")


class CorpusError(UserError):
  """A malformed corpus (or failed-requests) line; the message names the file and line."""


class TopLogprob(TypedDict):
  token: str
  logprob: float


class TokenLogprob(TypedDict):
  token: str
  logprob: float
  top_logprobs: list[TopLogprob]


class Record(TypedDict, total=False):
  id: str  # required
  messages: list[dict[str, str]]  # required
  response: str  # required
  sample_index: int  # required
  teacher: dict[str, Any]  # required; at least "model"
  finish_reason: str | None  # required (may be null)
  usage: dict[str, int]  # required
  logprobs: list[TokenLogprob] | None
  meta: dict[str, Any]


class Failure(TypedDict, total=False):
  id: str
  messages: list[dict[str, str]]
  sample_index: int
  teacher: dict[str, Any]
  status: str  # "failed"
  error: dict[str, Any]  # {"status_code": int | None, "type": str, "message": str}
  meta: dict[str, Any]


def record_id(messages: list[dict[str, str]], teacher: dict[str, Any], sample_index: int) -> str:
  """The stable id of one sample: sha256 over canonical JSON of prompt, params and sample index.

  Only the parameters in ID_PARAMS count (so changing e.g. the concurrency or n keeps old ids).
  """
  params = {k: teacher.get(k) for k in ID_PARAMS}
  msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
  blob = json.dumps({"messages": msgs, "params": params, "sample": int(sample_index)},
                    sort_keys=True, ensure_ascii=False, separators=(",", ":"))
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def _check(cond: bool, what: str, path: Any, lineno: int) -> None:
  if not cond:
    raise CorpusError(f"{path}:{lineno}: {what}")


def _validate_messages(obj: dict, path: Any, lineno: int) -> None:
  msgs = obj.get("messages")
  _check(isinstance(msgs, list) and len(msgs) > 0, "`messages` must be a non-empty list", path, lineno)
  for i, m in enumerate(msgs):
    _check(isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str),
           f"messages[{i}] must be {{'role': one of {_ROLES}, 'content': str}}, got {m!r:.120}",
           path, lineno)


def _validate_common(obj: Any, path: Any, lineno: int) -> None:
  _check(isinstance(obj, dict), f"expected a JSON object, got {type(obj).__name__}", path, lineno)
  _check(isinstance(obj.get("id"), str) and obj["id"] != "", "`id` must be a non-empty string",
         path, lineno)
  _validate_messages(obj, path, lineno)
  si = obj.get("sample_index")
  _check(isinstance(si, int) and not isinstance(si, bool) and si >= 0,
         "`sample_index` must be an integer >= 0", path, lineno)
  teacher = obj.get("teacher")
  _check(isinstance(teacher, dict) and isinstance(teacher.get("model"), str),
         "`teacher` must be an object with a string `model`", path, lineno)
  _check(isinstance(obj.get("meta", {}), dict), "`meta` must be an object", path, lineno)


def _is_logprob(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x) and x <= 1e-6


def _validate_logprobs(lps: Any, path: Any, lineno: int) -> None:
  if lps is None:
    return
  _check(isinstance(lps, list), "`logprobs` must be null or a list", path, lineno)
  for i, t in enumerate(lps):
    ok = isinstance(t, dict) and isinstance(t.get("token"), str) and _is_logprob(t.get("logprob"))
    _check(ok, f"logprobs[{i}] must be {{'token': str, 'logprob': number <= 0, 'top_logprobs': "
           f"[...]}}, got {t!r:.120}", path, lineno)
    tops = t.get("top_logprobs", [])
    _check(isinstance(tops, list), f"logprobs[{i}].top_logprobs must be a list", path, lineno)
    for j, u in enumerate(tops):
      _check(isinstance(u, dict) and isinstance(u.get("token"), str) and _is_logprob(u.get("logprob")),
             f"logprobs[{i}].top_logprobs[{j}] must be {{'token': str, 'logprob': number <= 0}}",
             path, lineno)


def validate_record(obj: Any, path: Any = "<corpus>", lineno: int = 0) -> Record:
  """Check one successful corpus record; raise CorpusError naming `path:lineno` if it is bad."""
  _validate_common(obj, path, lineno)
  _check(obj.get("status", "ok") == "ok",
         f"status {obj.get('status')!r}: failed requests belong in {FAILED_FILENAME}, not the corpus",
         path, lineno)
  _check(isinstance(obj.get("response"), str), "`response` must be a string", path, lineno)
  _check("finish_reason" in obj and (obj["finish_reason"] is None or isinstance(obj["finish_reason"], str)),
         "`finish_reason` must be a string or null", path, lineno)
  usage = obj.get("usage")
  _check(isinstance(usage, dict) and all(isinstance(usage.get(k), int) for k in
                                         ("prompt_tokens", "completion_tokens", "total_tokens")),
         "`usage` must hold integer prompt_tokens, completion_tokens and total_tokens", path, lineno)
  _validate_logprobs(obj.get("logprobs"), path, lineno)
  return obj


def validate_failure(obj: Any, path: Any = "<failed>", lineno: int = 0) -> Failure:
  """Check one line of `failed.jsonl`."""
  _validate_common(obj, path, lineno)
  _check(obj.get("status") == "failed", "`status` must be 'failed'", path, lineno)
  err = obj.get("error")
  _check(isinstance(err, dict) and isinstance(err.get("message"), str),
         "`error` must be an object with a string `message`", path, lineno)
  return obj


def _lines(path: epath.Path) -> Iterator[tuple[int, str, bool]]:
  """(line number, text, terminated) for each line of a text file."""
  with path.open("r", encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      yield lineno, line.rstrip("\n"), line.endswith("\n")


def read_jsonl(path: epath.PathLike, validate=validate_record, *, unique: bool = True) -> Iterator[dict]:
  """Validated objects of a JSON-lines file written by CorpusWriter (blank lines are skipped).

  An unterminated last line that does not parse or validate is a torn write: dropped with a warning.
  Any other bad line raises CorpusError with `path:line`. With `unique`, a repeated id is an error.
  """
  path = epath.Path(path)
  seen: dict[str, int] = {}
  for lineno, text, terminated in _lines(path):
    if not text.strip():
      continue
    try:
      obj = validate(json.loads(text), path, lineno)
    except (json.JSONDecodeError, CorpusError) as e:
      if not terminated:
        logging.warning("%s:%d: dropping a torn last line (%d chars): %s", path, lineno, len(text), e)
        return
      if isinstance(e, json.JSONDecodeError):
        raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
      raise
    if unique:
      _check(obj["id"] not in seen, f"duplicate id {obj['id']!r} (first on line {seen.get(obj['id'])})",
             path, lineno)
      seen[obj["id"]] = lineno
    yield obj


def read_corpus(path: epath.PathLike) -> Iterator[Record]:
  """The successful teacher records of `corpus.jsonl`, validated, torn last line dropped."""
  return read_jsonl(path, validate_record)


def read_failures(path: epath.PathLike) -> Iterator[Failure]:
  """The lines of `failed.jsonl` (an id may repeat across resumed runs)."""
  return read_jsonl(path, validate_failure, unique=False)


def corpus_ids(path: epath.PathLike) -> set[str]:
  """The ids already in a corpus file (empty if the file does not exist)."""
  path = epath.Path(path)
  return {r["id"] for r in read_corpus(path)} if path.exists() else set()


def repair_tail(path: str | os.PathLike, validate=validate_record) -> int:
  """Make a local JSONL file end on a complete line; return the number of bytes cut.

  An unterminated last line is kept (newline added) if it is a valid record, else truncated.
  """
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return 0
  with open(path, "rb+") as f:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - 1))
    if f.read(1) == b"\n":
      return 0
    # Find the start of the last line, reading backwards in blocks.
    start, pos = 0, size
    while pos > 0:
      step = min(65536, pos)
      pos -= step
      f.seek(pos)
      nl = f.read(step).rfind(b"\n")
      if nl >= 0:
        start = pos + nl + 1
        break
    f.seek(start)
    tail = f.read()
    try:
      validate(json.loads(tail.decode("utf-8")), path, 0)
    except (ValueError, CorpusError):
      f.truncate(start)
      f.flush()
      os.fsync(f.fileno())
      logging.warning("%s: truncated a torn last line (%d bytes)", path, size - start)
      return size - start
    f.write(b"\n")
    f.flush()
    os.fsync(f.fileno())
    return 0


class CorpusWriter:
  """Append-only, durable JSONL writer: whole lines, flush + fsync every `sync_every` records.

  Local files only (fsync needs a file descriptor). Use as a context manager; `close` syncs.
  With `background_fsync`, the flush happens in `sync()` and the fsync (~4 ms on a laptop disk) in
  one helper thread, so an event loop calling `write` is not blocked; `close` waits for it. The
  flushed lines already survive a killed process; the fsync guards against a crash of the machine.
  A background fsync that failed (a full or failing disk) raises OSError naming the file at the next
  `sync()` or at `close()`: the lines it covered may not be on disk.
  """

  def __init__(self, path: str | os.PathLike, *, sync_every: int = 8, validate=validate_record,
               background_fsync: bool = False):
    self.path = os.fspath(path)
    self.sync_every = max(1, int(sync_every))
    self._validate = validate
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    repair_tail(self.path, validate)
    self._f = open(self.path, "a", encoding="utf-8")
    self._pending = 0
    self.written = 0
    self._fsyncer = ThreadPoolExecutor(1, thread_name_prefix="fsync") if background_fsync else None
    self._fsyncs: list[Future] = []  # background fsyncs not yet checked

  def write(self, obj: dict) -> None:
    self._validate(obj, f"{self.path} (record to append)", self.written + 1)
    self._f.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
    self._pending += 1
    self.written += 1
    if self._pending >= self.sync_every:
      self.sync()

  def _fsync_error(self, e: BaseException) -> OSError:
    msg = f"{self.path}: fsync failed ({e}); the last lines written may not be on disk"
    errno = getattr(e, "errno", None)
    return OSError(errno, msg) if errno else OSError(msg)

  def _fsync(self) -> None:
    try:
      os.fsync(self._f.fileno())
    except OSError as e:
      raise self._fsync_error(e) from e

  def _check_fsyncs(self, wait: bool = False) -> None:
    """Raise OSError for the first failed background fsync among those finished (all, with `wait`)."""
    if wait:
      futures.wait(self._fsyncs)
    done = [f for f in self._fsyncs if f.done()]
    self._fsyncs = [f for f in self._fsyncs if not f.done()]
    for f in done:
      e = f.exception()
      if e is not None:
        raise self._fsync_error(e) from e

  def sync(self) -> None:
    if self._fsyncer is not None:
      self._check_fsyncs()
    if self._pending:
      self._f.flush()
      if self._fsyncer is not None:
        self._fsyncs.append(self._fsyncer.submit(os.fsync, self._f.fileno()))
      else:
        self._fsync()
      self._pending = 0

  def close(self) -> None:
    if self._f.closed:
      return
    try:
      self.sync()
      if self._fsyncer is not None:
        self._check_fsyncs(wait=True)
        self._fsync()
    finally:
      if self._fsyncer is not None:
        self._fsyncer.shutdown(wait=True)
      self._f.close()

  def __enter__(self) -> "CorpusWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
      return
    try:  # Already failing: close, but do not hide the original error behind an fsync error.
      self.close()
    except OSError as e:
      logging.error("%s", e)
