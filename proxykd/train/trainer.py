"""One training run end to end: the model and where its weights come from, the mesh, the batches,
the compiled step with its frozen inputs, resume, the loop. Shared by every training stage (proxy
SFT, DPO rounds, the student's distillation and its SFT baseline); each brings its own Loss,
rows and frozen models.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
from absl import logging
from etils import epath
from jax.sharding import Mesh

from proxykd.data import batches
from proxykd.data.packing import Rows
from proxykd.models import checkpoint, hf_io
from proxykd.models.config import ModelConfig
from proxykd.errors import UserError
from proxykd.train import loop, manager, metrics, optimizer
from proxykd.train import sharding as shd
from proxykd.train import state as st
from proxykd.train import step as sp


def weights_ref(config) -> dict[str, Any]:
  """Where the trained model's initial weights come from: `config.init_from` (a Hugging Face
  directory or one of our checkpoints) or a random init seeded by `config.train.seed`."""
  source = config.get("init_from")
  if not source:
    return {"random": int(config.train.seed)}
  path = epath.Path(source)
  if (path / "config.json").exists():
    return {"hf": str(source)}
  if checkpoint.is_checkpoint(path):
    return {"checkpoint": str(source)}
  raise UserError(f"config.init_from={source}: neither a Hugging Face model directory (no "
                  "config.json) nor a checkpoint of ours (no numbered step with `meta`)")


def model_config(config, ref: dict[str, Any] | None = None) -> ModelConfig:
  """The trained model's config: the shape of `init_from`'s model with the run fields of
  `config.model` (dtype, remat, LoRA), or `config.model` itself for a random init."""
  block = ModelConfig.from_config_block(config.model)
  ref = ref or weights_ref(config)
  run = {f: getattr(block, f) for f in checkpoint.RUN_FIELDS}
  try:
    if "hf" in ref:
      return hf_io.read_hf_config(ref["hf"], **run)
    if "checkpoint" in ref:
      shape = ModelConfig.from_dict(checkpoint.restore_meta(ref["checkpoint"])["model"])
      return shape.replace(**run)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise UserError(f"config.init_from: {e}") from None
  return block


def make_mesh(config, models: dict[str, ModelConfig]) -> Mesh:
  """config.mesh, checked against the global batch and every model the step reads."""
  tc = config.train
  try:
    mesh = shd.mesh_from_config(config.mesh)
    shd.validate_mesh(mesh, models, tc.batch_size, tc.grad_accum)
  except (KeyError, ValueError) as e:
    raise UserError(str(e)) from None
  return mesh


def shardings_for(mesh: Mesh):
  """cfg -> the Shardings of that model's parameters on `mesh` (for checkpoint.load_params)."""
  return functools.partial(shd.param_shardings, mesh=mesh)


@dataclasses.dataclass
class Result:
  state: st.TrainState
  frozen: dict  # the step's frozen inputs, {"base": ...} included for LoRA
  cfg: ModelConfig
  mesh: Mesh

  @property
  def params(self):
    """The trained model's full parameters (LoRA adapters combined with their base)."""
    from proxykd.models import lora  # pylint: disable=g-import-not-at-top
    return lora.combine(self.state.params, self.frozen.get(lora.BASE))


def fit(config, out_dir: epath.PathLike, cfg: ModelConfig, mesh: Mesh, loss: sp.Loss, rows: Rows,
        eval_rows: Rows | None, meta: dict[str, Any], ref: dict[str, Any], *,
        frozen: dict | None = None, frozen_spec: dict | None = None,
        features: Sequence[batches.BatchFeature] = (), start=None,
        eval_loss: sp.Loss | None = None) -> Result:
  """Train `cfg` (initial weights from `ref`) on `rows`, resuming from `<out_dir>/checkpoints`.

  `start`: the full initial parameters, already on the mesh, instead of loading `ref` (e.g. the
  previous DPO round's result; its trainable part is donated to the state). `ref` still names the
  base of a LoRA model in the checkpoints' meta.
  `frozen` / `frozen_spec`: other models' parameters the loss reads and their ShapeDtypeStructs
  with shardings (state.model_spec); a LoRA model's base joins them as frozen["base"].
  `features`: per-batch host features added to each training batch (proxykd/data/batches.py).
  `eval_loss`: what the held-out rows are scored with (default `loss`; it then gets the same
  features), e.g. the plain NLL of the teacher's tokens for a distillation run.
  """
  out_dir = epath.Path(out_dir)
  tc = config.train
  frozen, frozen_spec = dict(frozen or {}), dict(frozen_spec or {})
  frozen_spec.update(st.base_spec(cfg, mesh))
  host = batches.HostSlice(shd.batch_sharding(mesh), tc.batch_size)
  data = batches.BatchIterator(rows.arrays, tc.batch_size, config.data.seed, host.rows, features)
  eval_features = features if eval_loss is None else ()
  eval_batches = (batches.fixed_batches(eval_rows.arrays, tc.batch_size, host.rows, eval_features)
                  if eval_rows is not None and len(eval_rows) else [])
  steps = math.ceil(tc.epochs * data.num_rows / tc.batch_size) if tc.epochs > 0 else tc.steps
  meta = {**meta, "model": cfg.to_dict(), "steps": steps, **({"base": ref} if cfg.lora_rank else {})}

  tx, schedule = optimizer.make_optimizer(config.optim, steps)
  abstract = st.abstract_state(cfg, tx)
  shardings = st.state_shardings(cfg, tx, mesh)
  spec = sp.batch_spec(batches.local_spec(rows.arrays, len(host.rows), features), tc.batch_size, mesh)
  compiled = sp.compile_step(sp.make_train_step(loss, tx, schedule, grad_accum=tc.grad_accum),
                             abstract, shardings, spec, frozen_spec, mesh)
  eval_spec = spec if eval_loss is None else sp.batch_spec(
      batches.local_spec(eval_rows.arrays, len(host.rows)), tc.batch_size, mesh)
  eval_fn = (sp.compile_eval(sp.make_eval_step(eval_loss or loss), abstract.params, shardings.params,
                             eval_spec, frozen_spec, mesh) if eval_batches else None)

  ckpt = manager.TrainCheckpoints(out_dir / "checkpoints", keep=tc.keep, async_save=tc.async_save)
  latest = ckpt.latest_step()
  params = None
  if latest is None or cfg.lora_rank:
    params = start if start is not None else checkpoint.load_params(ref, cfg, shardings_for(mesh))
  if latest is not None:
    state, _, data_state = ckpt.restore(latest, st.with_shardings(abstract, shardings))
    base = st.init_base(cfg, params)
    try:
      data.restore(data_state)
    except ValueError as e:
      raise UserError(f"{ckpt.directory}/{latest}: {e}") from None
    logging.info("resumed from %s step %d", ckpt.directory, latest)
  else:
    state, base = st.init_state(cfg, tx, mesh, tc.seed, params)
  del params
  frozen.update(base)

  writer = metrics.MetricWriter(out_dir, steps, int(jax.device_get(state.step)), config.get("wandb"),
                                run_config=config.to_dict(), console=tc.progress_bar)
  try:
    state = loop.train(state, compiled, data, host, frozen, ckpt, meta, writer,
                       loop.LoopConfig(steps, tc.log_every, tc.eval_every, tc.save_every),
                       eval_fn, eval_batches)
  finally:
    writer.close()
  return Result(state, frozen, cfg, mesh)
