"""Stage `proxy_sft`: warm-up SFT of the proxy on D_w, then an HF export of the result.

Inputs: the teacher corpus (`config.corpus`, default `<workdir>/collect/corpus.jsonl`) and a
tokenizer. Outputs in `<workdir>/proxy_sft/`: `checkpoints/` (resumable; items params, meta,
train, data), `tensorboard/`, `metrics.jsonl` and, with `config.export`, `hf/`.
"""
from __future__ import annotations

from absl import logging

from proxykd import runner
from proxykd.models import hf_io, lora
from proxykd.models.tokenizer import fingerprint, load_tokenizer
from proxykd.stages.inputs import load_split, tokenizer_dir
from proxykd.train.sft import train_sft

STAGE = "proxy_sft"


def run(config, workdir):
  out = runner.stage_dir(workdir, STAGE)
  train, heldout, path = load_split(config, workdir)
  tok_dir = tokenizer_dir(config, workdir)
  tokenizer = load_tokenizer(tok_dir)
  meta = {"stage": STAGE, "corpus": str(path), "split": config.split_name,
          "tokenizer": str(tok_dir), "tokenizer_fingerprint": fingerprint(tokenizer)}
  result = train_sft(config, out, train, heldout, tokenizer, meta)
  if config.export:
    params, cfg = result.params, result.cfg
    if cfg.lora_rank:
      params, cfg = lora.merge(params, cfg)
    hf_io.export_hf(params, cfg, out / "hf", tokenizer_dir=tok_dir, dtype=config.export_dtype)
    logging.info("%s: exported %s", STAGE, out / "hf")
  return out
