"""Benchmark of training-time generation (the DPO sampler). Prints one JSON object.

- `kv_cache_speedup`: greedy decode tokens/s of our KV-cache sampler over a baseline that re-runs
  the whole sequence through the model for every new token (one jitted forward over the padded
  [batch, prompt + new] buffer per token); `small` preset (~25M), batch 8, 256 new tokens.
- `vs_transformers`: our greedy tokens/s over transformers' PyTorch `generate` (greedy, KV cache,
  the same weights exported as an HF directory), batch 8, 256 new tokens, same threads. Needs torch
  (requirements-test.txt).
- `recompiles_per_round`: programs the sampler compiles while sampling one DPO round of the demo:
  the runlocal config's sampling settings over the prompts of one round of D_p (from a demo
  workdir's corpus with `--workdir`, else synthetic-teacher prompts rendered with a demo tokenizer).

Timings are medians of interleaved repeats (ours and the baseline alternate), as the machine may be
shared; compare the ratios, not absolute times.

  python bench/generate.py [--batch 8] [--new 256] [--repeats 3] [--workdir DIR]
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
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

from proxykd.models import hf_io  # noqa: E402  pylint: disable=wrong-import-position
from proxykd.models.config import preset  # noqa: E402  pylint: disable=wrong-import-position
from proxykd.models.sampling import Sampler  # noqa: E402  pylint: disable=wrong-import-position
from proxykd.models.transformer import Transformer, init_params  # noqa: E402  pylint: disable=wrong-import-position


def reforward_greedy(cfg, params, prompts: np.ndarray, new: int) -> np.ndarray:
  """The no-cache baseline: every token re-reads the whole (padded) sequence."""
  b, p = prompts.shape
  forward = jax.jit(lambda prm, t: Transformer(cfg).apply({"params": prm}, t))

  @jax.jit
  def next_token(prm, tokens, at):
    logits = forward(prm, tokens)
    return jnp.argmax(jax.lax.dynamic_index_in_dim(logits, at - 1, axis=1, keepdims=False), -1)

  tokens = jnp.zeros((b, p + new), jnp.int32).at[:, :p].set(prompts)
  for i in range(new):
    tok = next_token(params, tokens, p + i)
    tokens = tokens.at[:, p + i].set(tok)
  return np.asarray(tokens[:, p:])


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def speed(cfg, params, batch: int, new: int, repeats: int, with_transformers: bool) -> dict:
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, cfg.vocab_size, (batch, 32)).astype(np.int32)
  sampler = Sampler(cfg)
  ours = lambda: sampler.generate(params, prompts.tolist(), max_new_tokens=new)
  first = ours()  # compiles
  assert all(len(g.tokens) == new for g in first)
  base = lambda: reforward_greedy(cfg, params, prompts, new)
  ref_tokens = base()  # compiles
  agree = float(np.mean(ref_tokens == np.asarray([g.tokens for g in first])))
  hf = None
  if with_transformers:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out_dir = tempfile.TemporaryDirectory()  # removed when the function returns
    out = out_dir.name
    hf_io.export_hf(params, cfg, out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor(prompts, dtype=torch.long)

    def hf():
      with torch.no_grad():
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    hf()  # warm-up
  times = {"ours": [], "reforward": [], "transformers": []}
  for _ in range(repeats):
    times["ours"].append(_timed(ours))
    times["reforward"].append(_timed(base))
    if hf is not None:
      times["transformers"].append(_timed(hf))
  tok_s = {k: batch * new / statistics.median(v) for k, v in times.items() if v}
  out = {"kv_cache_speedup": round(tok_s["ours"] / tok_s["reforward"], 2),
         "ours_tokens_per_s": round(tok_s["ours"], 1),
         "reforward_tokens_per_s": round(tok_s["reforward"], 1),
         "greedy_agreement_with_reforward": round(agree, 4)}
  if "transformers" in tok_s:
    out.update(vs_transformers=round(tok_s["ours"] / tok_s["transformers"], 2),
               transformers_tokens_per_s=round(tok_s["transformers"], 1))
  return out


def recompiles_per_round(workdir: str | None) -> dict:
  """Compiles while sampling round 1 of the demo's D_p with the runlocal sampling settings."""
  from configs import proxy_dpo as dpo_config  # pylint: disable=g-import-not-at-top
  from proxykd.data import corpus, split, tokenize  # pylint: disable=g-import-not-at-top
  from proxykd.models.tokenizer import build_demo_tokenizer, end_of_turn_ids, load_tokenizer  # pylint: disable=g-import-not-at-top
  from proxykd.stages import proxy_dpo  # pylint: disable=g-import-not-at-top
  config = dpo_config.get_config("runlocal")
  config.train.progress_bar = False
  if workdir:
    records = list(corpus.read_corpus(os.path.join(workdir, "collect", "corpus.jsonl")))
    tok = load_tokenizer(os.path.join(workdir, "tokenizer", "hf"))
    source = workdir
  else:  # The demo's prompts (collect:runlocal) answered by the synthetic teacher, offline.
    import random  # pylint: disable=g-import-not-at-top
    from configs import collect as collect_config  # pylint: disable=g-import-not-at-top
    from proxykd.data import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
    from proxykd.teacher import synthetic  # pylint: disable=g-import-not-at-top
    collect = collect_config.get_config("runlocal")
    rng, records = random.Random(0), []
    for p in prompts_lib.load_prompts(collect.prompts):
      messages = [{"role": "system", "content": collect.teacher.system_prompt}] + p["messages"]
      text = "".join(t.text for t in synthetic.respond(p["messages"][-1]["content"], rng=rng))
      records.append({"id": str(len(records)), "messages": messages, "response": text})
    tok_dir = tempfile.TemporaryDirectory()  # removed when the function returns
    tok = build_demo_tokenizer(tok_dir.name, [m["content"] for r in records for m in r["messages"]]
                               + [r["response"] for r in records])
    source = "the demo's prompts, answered offline by the synthetic teacher"
  align = split.split_records(records, config.split)["align"]
  examples, _ = tokenize.tokenize(proxy_dpo._round_records(align, config, 1), tok)  # pylint: disable=protected-access
  cfg = preset("tiny", vocab_size=max(512, len(tok)))
  sampler = Sampler(cfg, min_batch=config.dpo.sample_batch)
  with tempfile.TemporaryDirectory() as tmp:
    from etils import epath  # pylint: disable=g-import-not-at-top
    proxy_dpo.sample_round(sampler, init_params(cfg, jax.random.PRNGKey(0)), examples,
                           epath.Path(tmp) / "samples.jsonl", config, 1, end_of_turn_ids(tok))
  return {"recompiles_per_round": sampler.compiles, "round_prompts": len(examples),
          "round_source": source}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--new", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--preset", default="small")
  ap.add_argument("--workdir", default="")
  ap.add_argument("--no_transformers", action="store_true")
  args = ap.parse_args()
  cfg = preset(args.preset, dtype="float32")
  params = init_params(cfg, jax.random.PRNGKey(0))
  result = speed(cfg, params, args.batch, args.new, args.repeats, not args.no_transformers)
  result.update(recompiles_per_round(args.workdir or None))
  result.update(preset=args.preset, params=cfg.num_params, batch=args.batch, new_tokens=args.new,
                repeats=args.repeats, backend=jax.default_backend())
  print(json.dumps(result))


if __name__ == "__main__":
  main()
