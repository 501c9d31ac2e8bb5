"""Each big-model stage's device programs under a pod layout, built abstractly and lowered.

Nothing is allocated: parameters, optimizer state, frozen models and batches are
ShapeDtypeStructs carrying the NamedShardings the stage would use (the same library calls:
`state.abstract_state` / `state_shardings` / `base_spec` / `model_spec`, `step.batch_spec`, the
stage's own Loss), and the program is traced and lowered to StableHLO for the layout's mesh, so
a shape, sharding or divisibility mistake fails here as it would on the pod. The per-device bytes
of every argument come from those shardings (`shard_shape`), exactly.

The jit signatures mirror proxykd/train/step.py `compile_step` (state donated, batch and frozen
inputs with their shardings, replicated metrics) and proxykd/train/scoring.py `Scorer` (params
and batch sharded, stats batch-sharded), stopping at `.lower()`: compiling 70B programs for tens
of devices on a CPU takes minutes and XLA:CPU's buffer sizes say little about a TPU's or GPU's.

Needs as many (simulated) devices as the layout has: run it through launch/memory.py, which sets
XLA_FLAGS=--xla_force_host_platform_device_count in a subprocess per device count.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from proxykd.data.packing import ROW_KEYS
from proxykd.estimator import calibration
from proxykd.estimator.features import KEYS as PRIOR_KEYS
from proxykd.models.checkpoint import with_shardings
from proxykd.models.config import ModelConfig
from proxykd.models.transformer import Transformer, abstract_params, lm_head_kernel
from proxykd.train import distill, optimizer, preference, scoring
from proxykd.train import sharding as shd
from proxykd.train import state as st
from proxykd.train import step as sp


@dataclasses.dataclass
class Program:
  """One lowered program and the per-device bytes of its inputs."""
  name: str  # e.g. "proxy_sft/step"
  kind: str  # "train" or "forward"
  lowered: Any  # jax.stages.Lowered
  bytes: dict[str, int]  # per device: params, opt_state, frozen, batch
  rows: int  # global rows per call (per micro-batch for a training step)
  models: dict[str, ModelConfig]  # "model": the trained / scored one; "proxy": a frozen proxy


def device_bytes(tree) -> int:
  """Bytes of `tree`'s ShapeDtypeStructs held by one device under their shardings (the largest
  shard; shardings here divide evenly, so every device holds the same)."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def _row_spec(seq_len: int, extra: dict[str, tuple[tuple[int, ...], Any]] | None = None) -> dict:
  """{name: (per-row shape, dtype)} of packed rows (proxykd/data/packing.py) plus features."""
  spec = {k: ((seq_len,), np.dtype(np.int32)) for k in ROW_KEYS}
  for name, (shape, dtype) in (extra or {}).items():
    spec[name] = ((seq_len, *shape), np.dtype(dtype))
  return spec


def train_program(name: str, cfg: ModelConfig, train, optim, mesh: Mesh, loss: sp.Loss,
                  element_spec: dict, frozen_spec: dict, models: dict) -> Program:
  """The training step of proxykd/train/trainer.py `fit` for `cfg`, lowered on `mesh`."""
  shd.validate_mesh(mesh, models, train.batch_size, train.grad_accum)
  tx, schedule = optimizer.make_optimizer(optim, max(int(train.steps), 1))
  abstract = st.abstract_state(cfg, tx)
  shardings = st.state_shardings(cfg, tx, mesh)
  frozen_spec = {**frozen_spec, **st.base_spec(cfg, mesh)}
  batch = sp.batch_spec(element_spec, train.batch_size, mesh)
  step = sp.make_train_step(loss, tx, schedule, grad_accum=train.grad_accum)
  jitted = jax.jit(step, in_shardings=(shardings, sp._shardings(batch), sp._shardings(frozen_spec)),  # pylint: disable=protected-access
                   out_shardings=(shardings, shd.replicated(mesh)), donate_argnums=(0,))
  state = st.with_shardings(abstract, shardings)
  with shd.mesh_context(mesh):
    lowered = jitted.lower(state, batch, frozen_spec)
  sizes = {"params": device_bytes(state.params), "opt_state": device_bytes(state.opt_state),
           "frozen": device_bytes(frozen_spec), "batch": device_bytes(batch)}
  return Program(name, "train", lowered, sizes, train.batch_size // train.grad_accum, models)


def forward_program(name: str, cfg: ModelConfig, mesh: Mesh, global_batch: int, seq_len: int,
                    stats, features: dict | None = None, models: dict | None = None) -> Program:
  """A scoring pass (proxykd/train/scoring.py `Scorer`) of `cfg` over `global_batch` rows."""
  shd.validate_mesh(mesh, {"model": cfg}, global_batch)
  model = Transformer(cfg)

  def score(params, batch):
    hidden = model.apply({"params": params}, batch["inputs"], batch["positions"],
                         batch["segment_ids"], return_hidden=True)
    return stats(hidden, lm_head_kernel(params, cfg), batch)

  shapes = {**{k: ((), np.int32) for k in scoring.SCORE_KEYS}, **(features or {})}
  batch = {k: jax.ShapeDtypeStruct((global_batch, seq_len, *shape), dtype,
                                   sharding=shd.batch_sharding(mesh, 2 + len(shape)))
           for k, (shape, dtype) in shapes.items()}
  param_sh = shd.param_shardings(cfg, mesh)
  params = with_shardings(abstract_params(cfg), param_sh)
  jitted = jax.jit(score, in_shardings=(param_sh, {k: v.sharding for k, v in batch.items()}))
  with shd.mesh_context(mesh):
    lowered = jitted.lower(params, batch)
  sizes = {"params": 0, "opt_state": 0, "frozen": device_bytes(params), "batch": device_bytes(batch)}
  return Program(name, "forward", lowered, sizes, global_batch, models or {"model": cfg})


def inference_config(proxy_block) -> ModelConfig:
  """The aligned proxy as later stages load it: LoRA merged, the proxy stages' dtypes
  (proxykd/stages/inputs.py `inference_config`)."""
  return ModelConfig.from_config_block(proxy_block).replace(lora_rank=0)


def stage_programs(stage: str, config, proxy_block) -> list[Program]:
  """The programs `stage` runs on its big models under `config` (a stage config with a pod
  layout applied); `proxy_block` is the proxy stages' `config.model` (for the later stages,
  which take the proxy from its checkpoint)."""
  mesh = shd.mesh_from_config(config.mesh)
  seq = config.data.seq_len
  if stage in ("proxy_sft", "proxy_dpo"):
    cfg = ModelConfig.from_config_block(config.model)
    chunk = config.train.loss_chunk
    if stage == "proxy_sft":
      return [train_program("proxy_sft/step", cfg, config.train, config.optim, mesh,
                            sp.sft_loss(cfg, chunk), _row_spec(seq), {}, {"model": cfg})]
    d = config.dpo
    loss = preference.dpo_loss(cfg, beta=d.beta, lam=d.lam, nll_weight=d.nll_weight, kind=d.loss,
                               chunk_len=chunk)
    spec = _row_spec(seq, {"dpo_role": ((), np.int32), "ref_logp": ((), np.float32)})
    return [train_program("proxy_dpo/step", cfg, config.train, config.optim, mesh, loss, spec, {},
                          {"model": cfg}),
            forward_program("proxy_dpo/reference", cfg, mesh, config.train.batch_size, seq,
                            scoring.target_stats(chunk))]
  proxy = inference_config(proxy_block)
  if stage == "calibrate":
    kt = config.teacher_topk
    stats = calibration.proxy_stats(config.grid.tau, config.loss_chunk, kt)
    return [forward_program("calibrate/proxy", proxy, mesh, config.batch_size, seq, stats,
                            {"teacher_ids": ((kt,), np.int32)} if kt else None)]
  if stage == "cache_proxy":
    target = scoring.target_stats(config.loss_chunk)
    stats = scoring.combined(scoring.topk_stats(config.k, config.loss_chunk, 1.0),
                             lambda h, k, b: {"target_logp": target(h, k, b)["logp"]})
    return [forward_program("cache_proxy/proxy", proxy, mesh, config.batch_size, seq, stats)]
  if stage == "student_kd":
    cfg = ModelConfig.from_config_block(config.model)
    kd = config.kd
    # The default run: the posterior with the prior's top-K as features (kappa > 0, m finite),
    # the proxy inside the step; weighted by a proxy scoring pass first.
    settings = distill.KDSettings(alpha=kd.alpha, divergence=kd.divergence, mode="online",
                                  kappa=1.0, m=1.0, tau=1.0, use_prior=True,
                                  chunk_len=config.train.loss_chunk)
    k = kd.prior_k
    spec = _row_spec(seq, {PRIOR_KEYS[0]: ((k,), np.int32), PRIOR_KEYS[1]: ((k,), np.float32),
                           PRIOR_KEYS[2]: ((), np.float32), "weight": ((), np.float32)})
    frozen = {distill.PROXY: st.model_spec(proxy, mesh)}
    models = {"model": cfg, "proxy": proxy}
    return [train_program("student_kd/step", cfg, config.train, config.optim, mesh,
                          distill.kd_loss(cfg, settings, proxy), spec, frozen, models),
            forward_program("student_kd/weights", proxy, mesh, config.train.batch_size, seq,
                            scoring.target_stats(config.train.loss_chunk))]
  raise ValueError(f"no programs for stage {stage!r}")
