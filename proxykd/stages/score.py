"""Stage `score`: per-token and per-sequence log-likelihood of (messages, response) JSON lines
under a model (proxykd/eval/score.py has the formats).

Inputs: `config.model` (one of our checkpoints or an HF directory) and `config.input`. Outputs:
`config.output` (default `<workdir>/score/scores.jsonl`, one line per input line, in order) and
`<workdir>/score/summary.json`.
"""
from __future__ import annotations

import json
import time

from absl import logging
from etils import epath

from proxykd import paths, runner
from proxykd.eval import jsonl, loglik, model as eval_model, score
from proxykd.stages.eval import open_model
from proxykd.train import scoring, trainer

STAGE = "score"


def run(config, workdir):
  out = runner.stage_dir(workdir, STAGE)
  if not config.input:
    raise runner.UserError("score: set --config.input=FILE (JSON lines of {messages, response})")
  records = score.load_inputs(config.input)
  spec, tokenizer, mesh = open_model(config, {"config.batch_size": config.batch_size})
  params = eval_model.load(spec, trainer.shardings_for(mesh))
  scorer = scoring.Scorer(spec.cfg, mesh, config.batch_size, config.data.seq_len, config.loss_chunk)
  t0 = time.perf_counter()
  try:
    scored = loglik.response_logprobs(records, tokenizer, lambda rows: scorer(params, rows),
                                      seq_len=config.data.seq_len, truncation=config.data.truncation,
                                      length_policy=config.data.length_policy)
  except ValueError as e:  # a tokenizer whose chat template cannot be split, a bad policy name
    raise runner.UserError(f"score: {e}") from None
  rows = score.output_rows(records, scored)
  output = epath.Path(config.output or out / "scores.jsonl")
  output.parent.mkdir(parents=True, exist_ok=True)
  jsonl.write_lines(output, rows)
  summary = {"model": spec.identity, "input": config.input, "output": str(output),
             **score.summary(rows), "seconds": round(time.perf_counter() - t0, 2)}
  out.mkdir(parents=True, exist_ok=True)
  paths.write_text(out / "summary.json", json.dumps(summary, indent=2))
  logging.info("%s: %s", STAGE, summary)
  print(f"scored {len(rows)} lines ({summary['tokens']} tokens, perplexity "
        f"{summary['perplexity']:.4g}) -> {output}")
  return output
