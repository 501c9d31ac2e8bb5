"""Benchmark of the eval stage's generation on GSM8K. Prints one JSON object.

- `gsm8k_examples_per_s`: GSM8K test problems answered per second by the eval stage's generation
  path (proxykd/eval/generate.py `run_task` over the KV-cache sampler): `tiny` preset (random
  weights, so every answer runs the full 256 new tokens), the first `--limit` (64) problems,
  zero-shot with the stage's system prompt, greedy, batches of `--batch` (64), this CPU.
- `vs_sequential`: that throughput over the same path one example at a time (batch 1), measured on
  the first `--sequential` (16) problems. Target >= 4.

Both paths are compiled before they are timed (a warm-up pass); each timing is the median of
`--repeats` interleaved runs, as the machine may be shared: compare the ratio, not absolute times.
The demo tokenizer (a 512-token byte-level BPE) is trained on the GSM8K train questions first.

  python bench/eval.py [--limit 64] [--batch 64] [--new 256] [--sequential 16] [--repeats 3]
                       [--preset tiny]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  pylint: disable=wrong-import-position

from configs import eval as eval_config  # noqa: E402  pylint: disable=wrong-import-position
from proxykd.data import prompts  # noqa: E402  pylint: disable=wrong-import-position
from proxykd.eval import generate, tasks  # noqa: E402  pylint: disable=wrong-import-position
from proxykd.models.config import preset  # noqa: E402  pylint: disable=wrong-import-position
from proxykd.models.sampling import Sampler  # noqa: E402  pylint: disable=wrong-import-position
from proxykd.models.tokenizer import build_demo_tokenizer, end_of_turn_ids  # noqa: E402  pylint: disable=wrong-import-position
from proxykd.models.transformer import init_params  # noqa: E402  pylint: disable=wrong-import-position


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--limit", type=int, default=64)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--new", type=int, default=256)
  ap.add_argument("--sequential", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--preset", default="tiny", help="model preset (random weights)")
  args = ap.parse_args()

  root = prompts.data_dir()
  train = prompts.load_rows(str(root / "gsm8k" / "train.jsonl"))
  tok_dir = tempfile.TemporaryDirectory(prefix="bench-eval-tok-")  # removed at exit
  tokenizer = build_demo_tokenizer(tok_dir.name,
                                   [r["question"] + "\n" + r["answer"] for r in train], vocab_size=512)
  cfg = preset(args.preset, vocab_size=512)
  params = init_params(cfg, jax.random.PRNGKey(0))
  task = tasks.gsm8k_task(root, system_prompt=eval_config.GSM_SYSTEM, limit=args.limit,
                          max_new_tokens=args.new)
  few = tasks.Task(task.name, task.items[:args.sequential], task.max_new_tokens)
  end_ids = end_of_turn_ids(tokenizer)
  samplers = {b: Sampler(cfg) for b in (args.batch, 1)}  # as the eval stage builds it
  generated = {"tokens": 0}

  def runner(batch: int, t: tasks.Task):
    def gen(prompt_ids, max_new, stop_ids):
      out = samplers[batch].generate(params, prompt_ids, max_new_tokens=max_new, eos_ids=end_ids,
                                     stop_ids=stop_ids)
      generated["tokens"] += sum(len(g.tokens) for g in out)
      return out
    return lambda: generate.run_task(t, gen, tokenizer, batch_size=batch,
                                     max_context=cfg.max_position_embeddings, end_ids=end_ids,
                                     model_key="bench")

  batched, sequential = runner(args.batch, task), runner(1, few)
  batched()  # warm-up: compiles every (batch, prompt length) bucket it needs
  sequential()
  times = {"batched": [], "sequential": []}
  for _ in range(args.repeats):
    for name, fn in (("batched", batched), ("sequential", sequential)):
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  per_s = {"batched": len(task.items) / statistics.median(times["batched"]),
           "sequential": len(few.items) / statistics.median(times["sequential"])}
  print(json.dumps({
      "gsm8k_examples_per_s": round(per_s["batched"], 2),
      "vs_sequential": round(per_s["batched"] / per_s["sequential"], 2),
      "sequential_examples_per_s": round(per_s["sequential"], 3),
      "examples": len(task.items), "sequential_examples": len(few.items), "batch": args.batch,
      "max_new_tokens": args.new, "preset": args.preset,
      "compiles": {"batched": samplers[args.batch].compiles, "sequential": samplers[1].compiles},
      "mean_new_tokens": round(generated["tokens"] / ((1 + args.repeats) * (len(task.items) + len(few.items))), 1),
      "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
      "cpus": os.cpu_count()}))


if __name__ == "__main__":
  main()
