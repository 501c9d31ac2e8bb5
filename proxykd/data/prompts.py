"""Prompts to send to the teacher: files through `datasets` with a field mapping, or named sets.

A prompt is `{"messages": [{"role", "content"}, ...], "meta": {...}}`. Sources (config `prompts`):
- `file`: JSONL, JSON (a list of objects, or an object whose `json_field` holds the list) or parquet,
  loaded with `datasets`. Either `messages_field` names a column that already holds a chat list, or
  `prompt_field` a column of text that becomes the user message; `meta_fields` (comma-separated)
  are copied into `meta`.
- `gsm8k`: `<data_dir>/gsm8k/<split>.jsonl`, meta `answer` = the number after '####'.
- `bbh`: `<data_dir>/bbh/tasks/<task>.json` for `tasks` ("all" or comma-separated), meta `task` and
  `target`; with `cot`, the task's 3-shot chain-of-thought prompt is put before the question.
- `synthetic`: `num` problems of the synthetic teacher's generator (`split` train|heldout, `seed`).
- `tfds:NAME[/CONFIG][:SPLIT]`: a TensorFlow Datasets dataset already prepared in `data_dir` (TFDS'
  own default directory when empty), read with `tfds.data_source` (random access to its
  ArrayRecord files: no TensorFlow, never a download); the split defaults to `split`. Text
  features arrive as bytes and are decoded as UTF-8; then the field mapping of `file` applies.
  tensorflow-datasets is an optional extra (requirements-tfds.txt).
`data_dir` defaults to ../shared/data beside the repository (for tfds: TFDS' default). `offset`/`limit`
take a slice.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from etils import epath

from proxykd.errors import UserError

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def data_dir(cfg_dir: str = "") -> Path:
  return Path(cfg_dir) if cfg_dir else DEFAULT_DATA_DIR


def _locate_bad_json_line(path: epath.Path) -> str | None:
  """`path:line: ...` for the first line of a JSONL file that is not a JSON object, if any."""
  with path.open("r", encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        return f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})"
      if not isinstance(obj, dict):
        return f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
  return None


def load_rows(path: str, json_field: str = "") -> list[dict]:
  """The rows of a JSONL/JSON/parquet file as dicts, through `datasets`; errors name the file/line."""
  import datasets  # pylint: disable=import-outside-toplevel  (slow import, only when loading files)

  p = epath.Path(path)
  if not p.exists():
    raise UserError(f"prompt file {path} does not exist")
  builder = _FORMATS.get(p.suffix.lower())
  if builder is None:
    raise UserError(f"prompt file {path}: unknown format {p.suffix!r}; use .jsonl, .json or .parquet")
  if p.suffix.lower() == ".jsonl":
    bad = _locate_bad_json_line(p)  # datasets' own message names neither the file nor the line
    if bad:
      raise UserError(bad)
  datasets.disable_progress_bars()
  kwargs = {"field": json_field} if json_field else {}
  try:
    ds = datasets.load_dataset(builder, data_files=str(p), split="train", **kwargs)
  except Exception as e:  # pylint: disable=broad-except  (datasets wraps every parse error)
    cause = e.__cause__ or e
    raise UserError(f"prompt file {path}: cannot be read as {p.suffix} ({type(cause).__name__}: {cause})"
                    + (f"; check prompts.json_field={json_field!r}" if json_field else "")) from None
  return ds.to_list()


def _where(path: str, i: int) -> str:
  return f"{path}:{i + 1}" if path.endswith(".jsonl") else f"{path} (record {i})"


def rows_to_prompts(rows: list[dict], path: str, *, prompt_field: str = "", messages_field: str = "",
                    meta_fields: str = "", meta: dict | None = None) -> list[dict]:
  """Apply the field mapping; a row missing a mapped field is an error naming file and line."""
  if not (prompt_field or messages_field):
    raise UserError("set prompts.prompt_field (a text column) or prompts.messages_field (a chat column)")
  fields = [f for f in meta_fields.split(",") if f]
  out = []
  for i, row in enumerate(rows):
    if messages_field:
      msgs = row.get(messages_field)
      if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                      and m.get("role") for m in msgs)):
        raise UserError(f"{_where(path, i)}: field {messages_field!r} (prompts.messages_field) must be a "
                        f"non-empty list of {{role, content}}; got {str(msgs)[:80]!r}")
      msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    else:
      text = row.get(prompt_field)
      if not isinstance(text, str) or not text.strip():
        raise UserError(f"{_where(path, i)}: field {prompt_field!r} (prompts.prompt_field) is missing or not "
                        f"a non-empty string; the row has {sorted(row)}")
      msgs = [{"role": "user", "content": text}]
    m = dict(meta or {}, index=i)
    for f in fields:
      if f not in row:
        raise UserError(f"{_where(path, i)}: field {f!r} (prompts.meta_fields) is missing; the row has {sorted(row)}")
      m[f] = row[f]
    out.append({"messages": msgs, "meta": m})
  return out


def gsm8k_answer(solution: str) -> str:
  return solution.rsplit("####", 1)[-1].strip().replace(",", "")


def load_gsm8k(root: Path, split: str) -> list[dict]:
  path = root / "gsm8k" / f"{split}.jsonl"
  rows = load_rows(str(path))
  prompts = rows_to_prompts(rows, str(path), prompt_field="question", meta={"source": f"gsm8k:{split}"})
  for p, row in zip(prompts, rows):
    p["meta"]["answer"] = gsm8k_answer(row["answer"])
  return prompts


def bbh_cot_prompt(root: Path, task: str) -> str:
  """The 3-shot CoT prompt of a BBH task, without its canary header and '-----' line."""
  text = (root / "bbh" / "cot-prompts" / f"{task}.txt").read_text(encoding="utf-8")
  return text.split("-----", 1)[1].strip() if "-----" in text else text.strip()


def load_bbh(root: Path, tasks: str, cot: bool) -> list[dict]:
  task_dir = root / "bbh" / "tasks"
  names = sorted(p.stem for p in task_dir.glob("*.json")) if tasks in ("", "all") else tasks.split(",")
  out = []
  for task in names:
    path = task_dir / f"{task}.json"
    if not path.exists():
      raise UserError(f"prompts.tasks: BBH task {task!r} not found in {task_dir}")
    prompts = rows_to_prompts(load_rows(str(path), json_field="examples"), str(path), prompt_field="input",
                              meta_fields="target", meta={"source": f"bbh:{task}", "task": task})
    if cot:
      prefix = bbh_cot_prompt(root, task)
      for p in prompts:
        p["messages"][0]["content"] = f"{prefix}\n\nQ: {p['messages'][0]['content']}\nA: Let's think step by step."
    out += prompts
  return out


TFDS_PREFIX = "tfds:"


def _plain(value: Any) -> Any:
  """A TFDS example's value as plain Python: bytes -> str, numpy scalars and arrays -> numbers and
  lists, nested feature dicts kept."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, np.ndarray):
    return [_plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def parse_tfds_source(source: str, default_split: str) -> tuple[str, str]:
  """`tfds:NAME[/CONFIG][:SPLIT]` -> (NAME[/CONFIG], SPLIT); UserError when there is no name."""
  name, _, split = source[len(TFDS_PREFIX):].partition(":")
  if not name:
    raise UserError(f"prompts.source={source!r}: expected tfds:NAME[/CONFIG][:SPLIT]")
  return name, split or default_split or "train"


def load_tfds_rows(source: str, data_dir: str = "", default_split: str = "train") -> tuple[list[dict], str]:
  """The examples of a prepared TFDS dataset as plain dicts -> (rows, "tfds:NAME:SPLIT")."""
  name, split = parse_tfds_source(source, default_split)
  where = f"{TFDS_PREFIX}{name}:{split}"
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError(f"prompts.source={source!r} needs tensorflow-datasets, an optional extra: "
                    "pip install -r requirements-tfds.txt") from None
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    rows = [_plain(ds[i]) for i in range(len(ds))]
  except Exception as e:  # pylint: disable=broad-except  (tfds raises many types; all name the cause)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"prompts.source={source!r} (data_dir {data_dir or 'TFDS default'}): "
                    f"{type(e).__name__}: {first}") from None
  return rows, where


def load_synthetic(num: int, split: str, seed: int) -> list[dict]:
  from proxykd.data import problems  # pylint: disable=import-outside-toplevel
  return [{"messages": [{"role": "user", "content": p.question}],
           "meta": {"source": f"synthetic:{split}", "index": i, "answer": str(p.answer), "template": p.template}}
          for i, p in enumerate(problems.generate(num, split, seed))]


def load_prompts(cfg: Any) -> list[dict]:
  """The prompts a `prompts` config block names (see the module docstring)."""
  source = cfg.source
  if source == "file":
    if not cfg.path:
      raise UserError("prompts.source='file' needs prompts.path")
    prompts = rows_to_prompts(load_rows(cfg.path, cfg.json_field), cfg.path, prompt_field=cfg.prompt_field,
                              messages_field=cfg.messages_field, meta_fields=cfg.meta_fields,
                              meta={"source": str(cfg.path)})
  elif source == "gsm8k":
    prompts = load_gsm8k(data_dir(cfg.data_dir), cfg.split or "train")
  elif source == "bbh":
    prompts = load_bbh(data_dir(cfg.data_dir), cfg.tasks, cfg.cot)
  elif source == "synthetic":
    prompts = load_synthetic(cfg.num, cfg.split or "train", cfg.seed)
  elif source.startswith(TFDS_PREFIX):
    rows, where = load_tfds_rows(source, cfg.data_dir, cfg.split)
    prompts = rows_to_prompts(rows, where, prompt_field=cfg.prompt_field,
                              messages_field=cfg.messages_field, meta_fields=cfg.meta_fields,
                              meta={"source": where})
  else:
    raise UserError(f"prompts.source={source!r}: choose file, gsm8k, bbh, synthetic or "
                    "tfds:NAME[/CONFIG][:SPLIT]")
  end = cfg.offset + cfg.limit if cfg.limit > 0 else None
  return prompts[cfg.offset:end]
