"""Supervised fine-tuning on teacher responses: the SFT loss through the shared trainer.

Used by the stages that fine-tune on text (proxy warm-up, the student's SFT baseline).
"""
from __future__ import annotations

from typing import Any, Sequence

from absl import logging
from etils import epath

from proxykd.data import pipeline
from proxykd.errors import UserError
from proxykd.train import step as sp
from proxykd.train import trainer


def build_rows(records, tokenizer, config, out_dir: epath.PathLike, what: str, shuffle: bool,
               transform=None):
  """Packed rows of `records` under config.data, cached in `<out_dir>/data_cache/`; `transform`
  (e.g. per-token features) as in pipeline.build_rows, keyed by its `key`."""
  data = config.data
  try:
    rows, stats = pipeline.build_rows(records, tokenizer, data, shuffle=shuffle,
                                      cache_dir=epath.Path(out_dir) / "data_cache", name=what,
                                      transform=transform,
                                      transform_key=transform.key if transform else "")
  except ValueError as e:
    raise UserError(str(e)) from None
  logging.info("%s: %d examples -> %d rows of %d tokens; %s (truncation %s, length_policy %s)",
               what, stats.total, len(rows), data.seq_len, stats.to_dict(), data.truncation,
               data.length_policy)
  return rows, stats


def train_sft(config, out_dir: epath.PathLike, train_records: Sequence[dict],
              eval_records: Sequence[dict], tokenizer, meta: dict[str, Any]) -> trainer.Result:
  """Train on `train_records` (resuming from `<out_dir>/checkpoints` if it has any)."""
  ref = trainer.weights_ref(config)
  cfg = trainer.model_config(config, ref)
  if len(tokenizer) > cfg.vocab_size:
    raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                    f"{cfg.vocab_size} (config.model.vocab_size or init_from)")
  mesh = trainer.make_mesh(config, {"model": cfg})
  rows, stats = build_rows(train_records, tokenizer, config, out_dir, "train", shuffle=True)
  eval_rows = (build_rows(eval_records, tokenizer, config, out_dir, "heldout", shuffle=False)[0]
               if eval_records else None)
  meta = {**meta, "truncation": stats.to_dict()}
  return trainer.fit(config, out_dir, cfg, mesh, sp.sft_loss(cfg, config.train.loss_chunk), rows,
                     eval_rows, meta, ref)
