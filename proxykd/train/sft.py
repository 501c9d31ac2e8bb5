"""Supervised fine-tuning on teacher responses, end to end: model, mesh, data, resume, loop.

Shared by the stages that fine-tune on text (proxy warm-up, the SFT student baseline).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from absl import logging
from etils import epath

from proxykd.data import batches, pipeline
from proxykd.models import hf_io
from proxykd.models.config import ModelConfig
from proxykd.runner import UserError
from proxykd.train import loop, manager, metrics, optimizer
from proxykd.train import sharding as shd
from proxykd.train import state as st
from proxykd.train import step as sp

# ModelConfig fields a run may change on a model loaded from HF (not its shape).
RUN_FIELDS = ("dtype", "param_dtype", "remat", "lora_rank", "lora_alpha", "lora_targets")


def model_config(config) -> ModelConfig:
  """The model: `config.init_from` (an HF directory) with the run fields of `config.model`, or
  `config.model` itself for a random init."""
  block = ModelConfig.from_config_block(config.model)
  if not config.get("init_from"):
    return block
  try:
    return hf_io.read_hf_config(config.init_from, **{f: getattr(block, f) for f in RUN_FIELDS})
  except FileNotFoundError as e:
    raise UserError(f"config.init_from: {e}") from None


def _rows(records, tokenizer, config, what: str, shuffle: bool):
  data = config.data
  rows, stats = pipeline.build_rows(records, tokenizer, data.seq_len, data.truncation, data.seed,
                                    shuffle=shuffle)
  logging.info("%s: %d examples -> %d rows of %d tokens; truncated %d, dropped %d (policy %s)",
               what, stats.total, len(rows["inputs"]), data.seq_len, stats.truncated,
               stats.dropped, data.truncation)
  return rows, stats


def train_sft(config, out_dir: epath.PathLike, train_records: Sequence[dict],
              eval_records: Sequence[dict], tokenizer, meta: dict[str, Any]):
  """Train (resuming from `<out_dir>/checkpoints` if it has any). -> (params, ModelConfig)."""
  out_dir = epath.Path(out_dir)
  cfg = model_config(config)
  tc = config.train
  if len(tokenizer) > cfg.vocab_size:
    raise UserError(f"the tokenizer has {len(tokenizer)} tokens but config.model.vocab_size is "
                    f"{cfg.vocab_size}")
  try:
    mesh = shd.mesh_from_config(config.mesh)
    shd.validate_mesh(mesh, cfg, tc.batch_size, tc.grad_accum)
  except (KeyError, ValueError) as e:
    raise UserError(str(e)) from None

  rows, stats = _rows(train_records, tokenizer, config, "train", shuffle=True)
  data = batches.BatchIterator(rows, tc.batch_size, config.data.seed)
  eval_rows, _ = _rows(eval_records, tokenizer, config, "held-out", shuffle=False)
  eval_batches = batches.fixed_batches(eval_rows, tc.batch_size) if eval_records else []
  steps = (math.ceil(tc.epochs * data.num_rows / tc.batch_size) if tc.epochs > 0 else tc.steps)
  meta = {**meta, "model": cfg.to_dict(), "truncation": stats.to_dict(), "steps": steps}

  tx, schedule = optimizer.make_optimizer(config.optim, steps, lora=cfg.lora_rank > 0)
  abstract = st.abstract_state(cfg, tx)
  shardings = st.state_shardings(cfg, tx, mesh)
  loss_fn = sp.sft_loss(cfg, tc.loss_chunk)
  step_fn = sp.make_train_step(loss_fn, tx, schedule, grad_accum=tc.grad_accum,
                               trainable=sp.trainable_for(cfg, abstract.params))
  batch_spec = sp.batch_spec(tc.batch_size, config.data.seq_len, mesh)
  compiled = sp.compile_step(step_fn, abstract, shardings, batch_spec, mesh)
  eval_fn = (sp.compile_eval(sp.make_eval_step(loss_fn), abstract.params, shardings.params,
                             batch_spec, mesh) if eval_batches else None)

  ckpt = manager.TrainCheckpoints(out_dir / "checkpoints", keep=tc.keep, async_save=tc.async_save)
  latest = ckpt.latest_step()
  if latest is not None:
    state, _, data_state = ckpt.restore(latest, st.with_shardings(abstract, shardings))
    try:
      data.restore(data_state)
    except ValueError as e:
      raise UserError(f"{ckpt.directory}/{latest}: {e}") from None
    logging.info("resumed from %s step %d", ckpt.directory, latest)
  else:
    params = None
    if config.get("init_from"):
      params, _ = hf_io.load_hf(config.init_from, shardings.params,
                                **{f: getattr(cfg, f) for f in RUN_FIELDS})
    state = st.init_state(cfg, tx, mesh, tc.seed, params=params)

  writer = metrics.MetricWriter(out_dir, steps, int(jax.device_get(state.step)), config.get("wandb"),
                                run_config=config.to_dict(), console=tc.progress_bar)
  try:
    state = loop.train(state, compiled, data, mesh, ckpt, meta, writer,
                       loop.LoopConfig(steps, tc.log_every, tc.eval_every, tc.save_every),
                       eval_fn, eval_batches)
  finally:
    writer.close()
  return state.params, cfg
