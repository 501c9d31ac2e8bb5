"""What stages read from earlier stages: the corpus and its splits, the tokenizer, a proxy model.

Each has an explicit config key (`corpus`, `tokenizer`, `proxy`) and a default in the workdir, so a
stage runs in the pipeline as is or on artefacts from elsewhere.
"""
from __future__ import annotations

import json
from typing import Any

from absl import logging
from etils import epath

from proxykd import runner
from proxykd.data import corpus, split
from proxykd.models import checkpoint, hf_io
from proxykd.models.config import ModelConfig
from proxykd.stages import tokenizer as tokenizer_stage

FINAL = "final.json"  # proxy_dpo's pointer to the aligned proxy's checkpoint


def tokenizer_dir(config, workdir) -> epath.Path:
  """config.tokenizer, else init_from's, else the collected or the trained demo tokenizer."""
  candidates = [config.get("tokenizer"), config.get("init_from"),
                epath.Path(workdir) / "collect" / "tokenizer", tokenizer_stage.output_dir(workdir)]
  for c in candidates:
    if c and (epath.Path(c) / "tokenizer_config.json").exists():
      return epath.Path(c)
  if config.get("tokenizer"):
    raise runner.UserError(f"config.tokenizer={config.tokenizer}: no tokenizer_config.json there")
  raise runner.UserError(
      "no tokenizer found: set --config.tokenizer=DIR (an HF tokenizer directory); looked in "
      f"{[str(c) for c in candidates if c]}")


def corpus_path(config, workdir) -> epath.Path:
  path = epath.Path(config.get("corpus") or runner.stage_dir(workdir, "collect") / corpus.CORPUS_FILENAME)
  if not path.exists():
    raise runner.UserError(f"corpus {path} does not exist; run the collect stage or set "
                           "--config.corpus=PATH")
  return path


def corpus_splits(config, workdir) -> tuple[dict[str, list[dict]], epath.Path]:
  """({warmup, align, distill, heldout: records}, the corpus path) under config.split."""
  path = corpus_path(config, workdir)
  try:
    parts = split.split_records(corpus.read_corpus(path), config.split)
  except ValueError as e:
    raise runner.UserError(str(e)) from None
  logging.info("%s: %s", path, {k: len(v) for k, v in parts.items()})
  return parts, path


def load_split(config, workdir) -> tuple[list[dict], list[dict], epath.Path]:
  """(the records of config.split_name, the held-out records, the corpus path)."""
  parts, path = corpus_splits(config, workdir)
  name = config.split_name
  if name == "all":
    train = [r for s in split.SPLITS for r in parts[s]]
  elif name in split.SPLITS:
    train = parts[name]
  else:
    raise runner.UserError(f"config.split_name={name!r}: choose one of {split.SPLITS} or all")
  if not train:
    raise runner.UserError(f"{path}: the {name} split is empty ({sum(map(len, parts.values()))} "
                           "records in the corpus)")
  return train, parts[split.HELDOUT], path


def proxy_ref(config, workdir) -> dict[str, Any]:
  """The aligned proxy: config.proxy (one of our checkpoints or an HF directory), else the last
  stage that trained one: proxy_dpo, then proxy_sft."""
  if config.get("proxy"):
    path = epath.Path(config.proxy)
    if (path / "config.json").exists():
      return {"hf": str(path)}
    if checkpoint.is_checkpoint(path):
      return {"checkpoint": str(path)}
    raise runner.UserError(f"config.proxy={config.proxy}: neither an HF model directory nor a "
                           "checkpoint of ours")
  final = runner.stage_dir(workdir, "proxy_dpo") / FINAL
  if final.exists():  # written when the last DPO round is done
    return json.loads(final.read_text())
  sft = runner.stage_dir(workdir, "proxy_sft") / "checkpoints"
  if checkpoint.is_checkpoint(sft):
    logging.warning("no finished proxy_dpo in %s: using the warm-up proxy %s", workdir, sft)
    return {"checkpoint": str(sft)}
  raise runner.UserError(f"no proxy in {workdir} (proxy_dpo/{FINAL} or proxy_sft/checkpoints); run "
                         "those stages or set --config.proxy=CHECKPOINT_OR_HF_DIR")


def inference_config(ref: dict[str, Any]) -> ModelConfig:
  """The (LoRA-free) config of the model a reference names, without loading its weights."""
  try:
    if "hf" in ref:
      return hf_io.read_hf_config(ref["hf"])
    return ModelConfig.from_dict(checkpoint.restore_meta(ref["checkpoint"])["model"]).replace(
        lora_rank=0)
  except (FileNotFoundError, ValueError) as e:
    raise runner.UserError(f"{ref}: {e}") from None


def model_for_inference(ref: dict[str, Any], shardings_for) -> tuple[Any, ModelConfig]:
  """(params with LoRA merged, their config) of a reference, placed by `shardings_for(cfg)`."""
  try:
    if "hf" in ref:
      cfg = hf_io.read_hf_config(ref["hf"])
      return checkpoint.load_params(ref, cfg, shardings_for), cfg
    params, cfg, _ = checkpoint.restore_for_inference(ref["checkpoint"], shardings_for)
    return params, cfg
  except (FileNotFoundError, ValueError) as e:
    raise runner.UserError(f"proxy {ref}: {e}") from None
