"""Reading a user's JSON-lines file: every bad line is an error naming the file and the line."""
from __future__ import annotations

import json
from typing import Callable, TypeVar

from etils import epath

from proxykd import paths
from proxykd.errors import UserError

T = TypeVar("T")


def read_lines(path: epath.PathLike, parse: Callable[[dict, str], T]) -> list[T]:
  """`parse(obj, "path:line")` of each non-blank line (a JSON object) of a JSONL file, in order.

  `parse` raises UserError (naming the place it is given) for an object it cannot use.
  """
  path = epath.Path(path)
  if not path.exists():
    raise UserError(f"{path}: no such file")
  out = []
  with path.open("r", encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
      out.append(parse(obj, where))
  if not out:
    raise UserError(f"{path}: no lines")
  return out


def write_lines(path: epath.PathLike, rows: list[dict]) -> None:
  """All of `rows` as a JSONL file, replacing it in one step."""
  paths.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
