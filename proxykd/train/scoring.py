"""Scoring passes: per-token log-probabilities of packed rows under a model, jitted once on the mesh.

Used wherever a model reads teacher text without training on it: DPO's reference log-probs (once
per round), held-out agreement and NLL after each round, and the sample weights of distillation.
The outputs are gathered to every host, in row order, so any host can join them to any row.
"""
from __future__ import annotations

import numpy as np
import jax
from jax.sharding import Mesh

from proxykd import hosts, losses
from proxykd.data import batches
from proxykd.data.packing import Rows
from proxykd.models.checkpoint import with_shardings
from proxykd.models.config import ModelConfig
from proxykd.models.transformer import Transformer, abstract_params, lm_head_kernel
from proxykd.train import sharding as shd

SCORE_KEYS = ("inputs", "targets", "positions", "segment_ids")


def target_stats(chunk_len: int):
  """Per slot: the log-probability of the target ("logp") and whether it is the argmax ("top1")."""
  def stats(hidden, kernel, batch):
    logp, top1 = losses.target_stats(hidden, kernel, batch["targets"], chunk_len)
    return {"logp": logp, "top1": top1}
  return stats


def topk_stats(k: int, chunk_len: int, tau: float = 1.0):
  """Per slot: the model's k most likely tokens ("ids", "logp") and the rest's log-mass ("tail")."""
  def stats(hidden, kernel, batch):
    del batch
    ids, logp, tail = losses.topk_logprobs(hidden, kernel, k, chunk_len, tau)
    return {"ids": ids, "logp": logp, "tail": tail}
  return stats


def combined(*stats_fns):
  """Several statistics from one forward pass."""
  def stats(hidden, kernel, batch):
    out = {}
    for fn in stats_fns:
      out.update(fn(hidden, kernel, batch))
    return out
  return stats


class Scorer:
  """`scorer(params, rows) -> {name: [N, T, ...]}`: per-slot statistics of packed rows under a
  model (default `target_stats`: the target's log-probability and whether it is the argmax;
  padding slots hold whatever the model gives there)."""

  def __init__(self, cfg: ModelConfig, mesh: Mesh, global_batch: int, seq_len: int,
               chunk_len: int = 256, stats=None, features: dict | None = None):
    """`features`: {name: (per-slot shape, dtype)} of further row arrays `stats` reads (e.g. the
    teacher's top-k ids, [k] int32), passed in the batch beside SCORE_KEYS."""
    self.cfg, self.mesh, self.global_batch = cfg, mesh, global_batch
    self.keys = SCORE_KEYS + tuple(features or {})
    model = Transformer(cfg)
    stats = stats or target_stats(chunk_len)

    def score(params, batch):
      hidden = model.apply({"params": params}, batch["inputs"], batch["positions"],
                           batch["segment_ids"], return_hidden=True)
      return stats(hidden, lm_head_kernel(params, cfg), batch)

    sharding = shd.batch_sharding(mesh)
    shapes = {**{k: ((), np.int32) for k in SCORE_KEYS}, **(features or {})}
    spec = {k: jax.ShapeDtypeStruct((global_batch, seq_len, *shape), dtype,
                                    sharding=shd.batch_sharding(mesh, 2 + len(shape)))
            for k, (shape, dtype) in shapes.items()}
    param_sh = shd.param_shardings(cfg, mesh)
    jitted = jax.jit(score, in_shardings=(param_sh, {k: v.sharding for k, v in spec.items()}))
    abstract = with_shardings(abstract_params(cfg), param_sh)
    with shd.mesh_context(mesh):
      self._compiled = jitted.lower(abstract, spec).compile()
    self.host = batches.HostSlice(sharding, global_batch)

  def __call__(self, params, rows: Rows, start: int = 0, stop: int | None = None
               ) -> dict[str, np.ndarray]:
    """Statistics of rows[start:stop] (all by default)."""
    arrays = {k: rows.arrays[k][start:stop] for k in self.keys}
    out = []
    for batch in batches.fixed_batches(arrays, self.global_batch, self.host.rows):
      out.append({k: hosts.to_host(v) for k, v in self._compiled(params, self.host.assemble(batch)).items()})
    n = len(arrays["inputs"])
    return {k: np.concatenate([o[k] for o in out])[:n] for k in out[0]}


def teacher_token_stats(scores: dict[str, np.ndarray], rows: Rows) -> dict[str, float]:
  """Over the response tokens of `rows`: the model's NLL (nats/token) of the teacher's tokens and
  how often the teacher's token is the model's argmax (top-1 agreement)."""
  mask = rows.arrays["loss_mask"].astype(bool)
  n = max(int(mask.sum()), 1)
  return {"nll": float(-scores["logp"][mask].sum() / n), "top1": float(scores["top1"][mask].sum() / n),
          "tokens": int(mask.sum())}
