"""The student's loss (METHOD.md stage 3): L = NLL_S(y) + alpha * w * D(p̂ || S), per response token.

p̂ is the estimator's posterior (proxykd/estimator/posterior.py) with the calibrated kappa, m, tau:
- online: the proxy (a frozen input of the step, sharded like the student) runs inside the step;
  its hidden states are split into chunks with the student's and each chunk's proxy logits are
  made from them (never [tokens, V] for all tokens at once);
- offline: the batch carries the cached proxy top-k (proxykd/data/proxy_cache.py `CacheFeature`),
  and the posterior lives on the union of the proxy's top-k, the prior's top-K, the label (and the
  teacher's top-k) plus one tail bucket.
The prior's top-K (`prior_*`), the teacher's mapped top-k (`teacher_*`, optional) and the sample
weight `weight` are per-token batch features. The fused chunked loss is proxykd/losses `distill`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from proxykd import losses
from proxykd.estimator import posterior
from proxykd.losses.targets import DenseTarget, SparseTarget
from proxykd.models.config import ModelConfig
from proxykd.models.transformer import Transformer, lm_head_kernel
from proxykd.train.step import Loss, token_count

PROXY = "proxy"  # frozen[PROXY]: the online proxy's parameters


@dataclasses.dataclass(frozen=True)
class KDSettings:
  alpha: float = 100.0
  divergence: str = "forward_kl"
  div_param: float | None = None  # JSD's beta, skew KL's lambda
  mode: str = "online"  # online | offline
  kappa: float = 0.0
  m: float = float("inf")
  tau: float = 1.0
  use_prior: bool = False  # the batch carries prior_* features
  use_teacher: bool = False  # the batch carries teacher_* features
  chunk_len: int = 256


def _prior(pp) -> posterior.Prior:
  return posterior.Prior(pp["prior_ids"], pp["prior_probs"], pp["prior_rest"])


def _uniform_prior(labels, vocab_size: int) -> posterior.Prior:
  """When no prior is loaded its weight must be 0 (kappa = 0 or m = inf): any proper pi will do."""
  return posterior.Prior(jnp.zeros((*labels.shape, 1), jnp.int32),
                         jnp.full((*labels.shape, 1), 1.0 / vocab_size, jnp.float32),
                         jnp.full(labels.shape, 1.0 / vocab_size, jnp.float32))


def target_fn(s: KDSettings, vocab_size: int):
  """(chunk of per-position inputs, shared inputs) -> the posterior as a soft target."""
  def fn(pp, shared):
    prior = _prior(pp) if s.use_prior else _uniform_prior(pp["labels"], vocab_size)
    teacher = posterior.TeacherTopK(pp["teacher_ids"], pp["teacher_logp"]) if s.use_teacher else None
    if s.mode == "online":
      logits = jnp.einsum("...e,ev->...v", pp["proxy_hidden"],
                          shared["proxy_kernel"].astype(pp["proxy_hidden"].dtype),
                          preferred_element_type=jnp.float32)
      return DenseTarget(posterior.posterior_logprobs(logits, prior, pp["labels"], s.kappa, s.m,
                                                      s.tau, teacher=teacher))
    ids, logp, tail = posterior.posterior_logprobs_sparse(
        pp["proxy_ids"], pp["proxy_logp"], pp["proxy_tail"], prior, pp["labels"], s.kappa, s.m,
        vocab_size, teacher=teacher)
    return SparseTarget(ids, logp, tail)
  return fn


PER_POSITION = {"online": (), "offline": ("proxy_ids", "proxy_logp", "proxy_tail")}


def kd_loss(cfg: ModelConfig, s: KDSettings, proxy_cfg: ModelConfig | None = None) -> Loss:
  """The student's Loss; `proxy_cfg` for the online mode (frozen[PROXY] holds its parameters).
  With alpha = 0 no target is computed: exactly the SFT loss."""
  if s.mode not in PER_POSITION:
    raise ValueError(f"config.kd.mode={s.mode!r}: choose online or offline")
  if s.alpha < 0:
    raise ValueError(f"config.kd.alpha={s.alpha} must be >= 0")
  if s.alpha and s.mode == "online" and proxy_cfg is None:
    raise ValueError("online distillation needs the proxy's config")
  div = None if s.divergence == "forward_kl" else losses.divergence(s.divergence, s.div_param)
  student = Transformer(cfg)
  proxy = Transformer(proxy_cfg) if proxy_cfg is not None else None
  soft = target_fn(s, cfg.vocab_size) if s.alpha else None

  def fn(params, frozen, batch, rng):
    del rng
    hidden = student.apply({"params": params}, batch["inputs"], batch["positions"],
                           batch["segment_ids"], return_hidden=True)
    mask = batch["loss_mask"].astype(jnp.float32)
    weight = batch["weight"] if "weight" in batch else jnp.ones_like(mask)
    per_position, shared = {"labels": batch["targets"]}, {}
    if soft is not None:
      per_position.update({k: batch[k] for k in PER_POSITION[s.mode]})
      per_position.update({k: batch[k] for k in batch if s.use_prior and k.startswith("prior_")})
      per_position.update({k: batch[k] for k in batch if s.use_teacher and k.startswith("teacher_")})
      if s.mode == "online":
        p = frozen[PROXY]
        per_position["proxy_hidden"] = jax.lax.stop_gradient(proxy.apply(
            {"params": p}, batch["inputs"], batch["positions"], batch["segment_ids"],
            return_hidden=True))
        shared["proxy_kernel"] = jax.lax.stop_gradient(lm_head_kernel(p, proxy_cfg))
    total, nll_sum, kd_sum = losses.distill(
        hidden, lm_head_kernel(params, cfg), batch["targets"], mask, weight=weight,
        per_position=per_position, shared=shared, target_fn=soft, alpha=s.alpha,
        divergence_fn=div, chunk_len=s.chunk_len)
    tokens = jnp.sum(mask)
    return total, {"distill/nll": (nll_sum, tokens), "distill/kl": (kd_sum, tokens),
                   "distill/weight_mean": (jnp.sum(weight * mask), tokens)}

  return Loss(fn, token_count)
