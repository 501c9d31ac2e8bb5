"""Greedy generation for a task, in batches, with exact stop strings and resumable predictions.

The caller brings `generate(prompts, max_new_tokens, stop_ids) -> [Generation]` (the sharded
KV-cache sampler bound to the model's parameters, proxykd/models/sampling.py). Items are sorted by
prompt length so each batch pads little and the sampler compiles one program per length bucket;
each batch's predictions are appended to the predictions file as soon as it finishes, keyed by a
hash of the model, the settings and the prompt, so a killed run redoes only what it had not
written. Batches are cut by prompt-length bucket (`length_batches`): padding a short prompt to a
long one's bucket would multiply the prefill's cost, except into rows the sampler pads anyway.
A stop string is matched twice: on the device, as the token ids it has on its own (the
batch stops early when the model writes them that way), and exactly on the host, where the text is
cut before its first occurrence whatever the tokens were.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Callable, Iterable, Sequence

from proxykd.eval.tasks import Item, Task
from proxykd.models.sampling import MAX_STOP, MAX_STOP_LEN, Generation, bucket

GenerateFn = Callable[[list[list[int]], int, list[list[int]]], list[Generation]]


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
  """`text` cut before the first occurrence of any stop string -> (text, whether one was found)."""
  cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
  return (text[:cut], True) if cut >= 0 else (text, False)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
  """The chat prompt with the generation prompt, tokenised as training tokenises conversations
  (rendered to text by the chat template, then tokenised without added special tokens)."""
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(tokenizer, stop: Sequence[str]) -> list[list[int]]:
  """The stop strings as token ids on their own, for the device-side early stop (those that fit)."""
  out = []
  for s in stop[:MAX_STOP]:
    ids = list(tokenizer(s, add_special_tokens=False)["input_ids"])
    if 0 < len(ids) <= MAX_STOP_LEN:
      out.append(ids)
  return out


def item_key(model_key: str, task: Task, ids: Sequence[int]) -> str:
  """What decides an item's output: the model, the generation settings and the prompt's ids."""
  h = hashlib.sha256(json.dumps([model_key, task.max_new_tokens, list(task.stop)]).encode())
  h.update(json.dumps(list(map(int, ids))).encode())
  return h.hexdigest()[:24]


@dataclasses.dataclass
class Progress:
  """Running counts for a progress bar."""
  done: int = 0
  correct: int = 0

  @property
  def accuracy(self) -> float:
    return self.correct / max(self.done, 1)


def _last_user(messages: list[dict]) -> str:
  return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def prediction_record(item: Item, key: str, text: str, gen: Generation, prompt_tokens: int,
                      prompt_cut: int) -> dict:
  pred = item.predict(text)
  return {"id": item.id, "key": key, "group": item.group, "prompt": _last_user(item.messages),
          "output": text, "prediction": pred, "gold": item.gold, "correct": item.correct(pred),
          "finish_reason": gen.finish_reason, "new_tokens": len(gen.tokens),
          "prompt_tokens": prompt_tokens, "prompt_cut": prompt_cut}


def length_batches(lengths: Sequence[int], order: Sequence[int], batch_size: int,
                   min_bucket: int = 16, rows: Callable[[int], int] = lambda n: bucket(n, 1)
                   ) -> list[list[int]]:
  """`order`'s items cut into batches of at most `batch_size`, longest prompts first.

  A batch holds the longest remaining prompts of one prompt-length bucket (powers of two, as the
  sampler pads them): a short prompt is never padded to a long one's bucket for nothing, as the
  prefill costs batch x bucket x cache length. But the sampler also pads the batch itself to
  `rows(n)` rows (a power of two); those rows cost the same whether empty or not, so they are
  filled with the next-longest prompts, from shorter buckets.
  """
  todo = sorted(zip(lengths, order), key=lambda x: -x[0])  # stable: ties keep their order
  out: list[list[int]] = []
  while todo:
    top = bucket(todo[0][0], min_bucket)
    same = next((i for i, (n, _) in enumerate(todo) if bucket(n, min_bucket) != top), len(todo))
    size = batch_size if same >= batch_size else min(batch_size, rows(same))
    out.append([i for _, i in todo[:size]])
    todo = todo[size:]
  return out


def run_task(task: Task, generate: GenerateFn, tokenizer, *, batch_size: int, max_context: int,
             end_ids: Sequence[int], model_key: str, done: dict[str, dict] | None = None,
             write: Callable[[list[dict]], None] | None = None,
             on_progress: Callable[[Progress, int], None] | None = None) -> list[dict]:
  """Predictions for every item of `task`, in item order.

  `done`: predictions already written ({id: record}); reused when their key matches. `write`: called
  with each finished batch's new records. `max_context`: the model's positions; a prompt that
  leaves fewer than max_new_tokens of them is cut from the left (counted in `prompt_cut`).
  """
  done = done or {}
  ids = [prompt_ids(tokenizer, item.messages) for item in task.items]
  room = max_context - task.max_new_tokens
  if room < 1:
    raise ValueError(f"{task.name}: max_new_tokens={task.max_new_tokens} leaves no room for a prompt "
                     f"in the model's {max_context} positions")
  keys = [item_key(model_key, task, p) for p in ids]
  results: dict[int, dict] = {}
  progress = Progress()
  for i, (item, key) in enumerate(zip(task.items, keys)):
    old = done.get(item.id)
    if old is not None and old.get("key") == key:
      results[i] = old
      progress.done += 1
      progress.correct += int(bool(old["correct"]))
  if on_progress:
    on_progress(progress, len(task.items))
  todo = sorted((i for i in range(len(task.items)) if i not in results), key=lambda i: (len(ids[i]), i))
  stop_ids = stop_token_ids(tokenizer, task.stop)
  drop = set(end_ids)
  for batch in length_batches([min(len(ids[i]), room) for i in todo], todo, batch_size):
    prompts = [ids[i][-room:] for i in batch]
    gens = generate(prompts, task.max_new_tokens, stop_ids)
    new = []
    for i, gen in zip(batch, gens):
      tokens = [t for t in gen.tokens if t not in drop]
      text, _ = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), task.stop)
      rec = prediction_record(task.items[i], keys[i], text, gen, len(ids[i]),
                              max(0, len(ids[i]) - room))
      results[i] = rec
      new.append(rec)
      progress.done += 1
      progress.correct += int(rec["correct"])
    if write:
      write(new)
    if on_progress:
      on_progress(progress, len(task.items))
  return [results[i] for i in range(len(task.items))]


def summarize(task: Task, records: Iterable[dict]) -> dict:
  """Accuracy overall and per group; for BBH the macro average over its tasks is `average`."""
  groups: dict[str, list[bool]] = {}
  cut = 0
  for r in records:
    groups.setdefault(r["group"], []).append(bool(r["correct"]))
    cut += int(r.get("prompt_cut", 0) > 0)
  total = sum(len(v) for v in groups.values())
  correct = sum(sum(v) for v in groups.values())
  out = {"accuracy": correct / max(total, 1), "correct": correct, "total": total,
         "prompts_cut": cut, "max_new_tokens": task.max_new_tokens}
  if len(groups) > 1 or task.name == "bbh":
    per = {g: sum(v) / len(v) for g, v in sorted(groups.items())}
    out["groups"] = {g: {"accuracy": per[g], "total": len(groups[g])} for g in per}
    out["average"] = sum(per.values()) / max(len(per), 1)
  return out
