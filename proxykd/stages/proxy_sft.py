"""Stage `proxy_sft`: warm-up SFT of the proxy on D_w, then an HF export of the result.

Inputs: the teacher corpus (`config.corpus`, default `<workdir>/collect/corpus.jsonl`) and a
tokenizer. Outputs in `<workdir>/proxy_sft/`: `checkpoints/` (resumable; items params, meta,
train, data), `tensorboard/`, `metrics.jsonl` and, with `config.export`, `hf/`.
"""
from __future__ import annotations

from absl import logging
from etils import epath

from proxykd import runner
from proxykd.data import corpus, split
from proxykd.models import hf_io
from proxykd.models.tokenizer import load_tokenizer
from proxykd.stages import tokenizer as tokenizer_stage
from proxykd.models import lora
from proxykd.train.sft import train_sft

STAGE = "proxy_sft"


def tokenizer_dir(config, workdir) -> epath.Path:
  candidates = [config.tokenizer, config.init_from,
                epath.Path(workdir) / "collect" / "tokenizer", tokenizer_stage.output_dir(workdir)]
  for c in candidates:
    if c and (epath.Path(c) / "tokenizer_config.json").exists():
      return epath.Path(c)
  if config.tokenizer:
    raise runner.UserError(f"config.tokenizer={config.tokenizer}: no tokenizer_config.json there")
  raise runner.UserError(
      "no tokenizer found: set --config.tokenizer=DIR (an HF tokenizer directory); looked in "
      f"{[str(c) for c in candidates if c]}")


def load_split(config, workdir) -> tuple[list[dict], list[dict], epath.Path]:
  path = epath.Path(config.corpus or runner.stage_dir(workdir, "collect") / corpus.CORPUS_FILENAME)
  if not path.exists():
    raise runner.UserError(f"corpus {path} does not exist; run the collect stage or set "
                           "--config.corpus=PATH")
  try:
    parts = split.split_records(corpus.read_corpus(path), config.split)
  except ValueError as e:
    raise runner.UserError(str(e)) from None
  name = config.split_name
  if name == "all":
    train = [r for s in split.SPLITS for r in parts[s]]
  elif name in split.SPLITS:
    train = parts[name]
  else:
    raise runner.UserError(f"config.split_name={name!r}: choose one of {split.SPLITS} or all")
  logging.info("%s: %s", path, {k: len(v) for k, v in parts.items()})
  if not train:
    raise runner.UserError(f"{path}: the {name} split is empty ({sum(map(len, parts.values()))} "
                           "records in the corpus)")
  return train, parts[split.HELDOUT], path


def run(config, workdir):
  out = runner.stage_dir(workdir, STAGE)
  train, heldout, path = load_split(config, workdir)
  tok_dir = tokenizer_dir(config, workdir)
  tokenizer = load_tokenizer(tok_dir)
  meta = {"stage": STAGE, "corpus": str(path), "split": config.split_name,
          "tokenizer": str(tok_dir)}
  result = train_sft(config, out, train, heldout, tokenizer, meta)
  if config.export:
    params, cfg = result.params, result.cfg
    if cfg.lora_rank:
      params, cfg = lora.merge(params, cfg)
    hf_io.export_hf(params, cfg, out / "hf", tokenizer_dir=tok_dir, dtype=config.export_dtype)
    logging.info("%s: exported %s", STAGE, out / "hf")
  return out
