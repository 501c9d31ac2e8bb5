"""Estimator fidelity: how close each estimate of the teacher's next-token distribution is to the
teacher's true one, measurable when the black box is one of our own models (METHOD.md stage 2).

On the response tokens of held-out teacher records, at each position h_t with the teacher's token
y_t, the teacher's distribution T(.|h_t) is its softmax at the temperature (and nucleus) it sampled
the records with. Compared with it, per token:
- `prior`: the corpus n-gram prior pi_t (proxykd/estimator/prior.py; held-out rows: no
  leave-one-out needed, and refused if the prior counted them);
- `proxy`: the aligned proxy's q_t = softmax(z_t / tau);
- `posterior`: the soft target p_hat_t = (kappa pi_t + e_t + m q_t) / (kappa + 1 + m);
- `posterior_no_label`: the same without the teacher's token, (kappa pi_t + m q_t) / (kappa + m)
  (what calibration scores; absent when kappa = m = 0);
- `student`: the evaluated model's softmax, when one is given.
Reported: KL(T || estimate) in nats/token and top-1 agreement (the estimate's argmax is the
teacher's), averaged over response tokens, and the teacher's entropy H(T) (so KL + H is the cross-
entropy calibration measures with held-out tokens).

One jitted function per batch of packed rows runs the models and reduces on the device: the vocab-
sized distributions exist one chunk of positions at a time ([rows x chunk, V] float32), never for
the whole batch; the host only adds the prior's sparse features and sums the per-batch totals.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from proxykd.data import batches
from proxykd.data.packing import Rows
from proxykd.estimator import posterior
from proxykd.estimator.features import KEYS as PRIOR_KEYS
from proxykd.models.config import ModelConfig
from proxykd.models.sampling import filter_logits
from proxykd.models.transformer import Transformer, lm_head_kernel

ESTIMATES = ("prior", "proxy", "posterior", "posterior_no_label", "student")
ROW_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask", "doc")
SCALARS = ("kappa", "m", "tau", "temperature", "top_p")


def kl_top1(log_t, log_p):
  """Per row of [N, V]: KL(T || p) (0 where T is 0; inf where p is 0 and T is not) and whether
  argmax p == argmax T."""
  t = jnp.exp(log_t)
  kl = jnp.sum(jnp.where(t > 0, t * (log_t - log_p), 0.0), axis=-1)
  return kl, jnp.argmax(log_p, axis=-1) == jnp.argmax(log_t, axis=-1)


def chunk_estimates(z_teacher, z_proxy, z_student, prior: posterior.Prior, labels, s: dict):
  """{name: (kl [N], top1 [N])} and the teacher's entropy [N] for one chunk of positions: logits
  [N, V] (z_student may be None), the prior's sparse features, labels [N], scalars `s`."""
  v = z_teacher.shape[-1]
  log_t = jax.nn.log_softmax(filter_logits(z_teacher.astype(jnp.float32), s["temperature"],
                                           s["top_p"], jnp.int32(0)), axis=-1)
  log_pi = posterior.dense_log_prior(prior, v)
  log_q = jax.nn.log_softmax(z_proxy.astype(jnp.float32) / s["tau"], axis=-1)
  is_label = jax.lax.broadcasted_iota(jnp.int32, log_q.shape, 1) == labels[:, None]
  est = {"prior": log_pi, "proxy": log_q,
         "posterior": posterior.mix(log_pi, log_q, is_label, posterior.weights(s["kappa"], s["m"], True)),
         "posterior_no_label": posterior.mix(log_pi, log_q, is_label,
                                             posterior.weights(s["kappa"], s["m"], False))}
  if z_student is not None:
    est["student"] = jax.nn.log_softmax(z_student.astype(jnp.float32), axis=-1)
  out = {k: kl_top1(log_t, lp) for k, lp in est.items()}
  entropy = -jnp.sum(jnp.where(log_t > -jnp.inf, jnp.exp(log_t) * log_t, 0.0), axis=-1)
  return out, entropy


def make_fidelity_fn(cfgs: dict[str, ModelConfig], chunk_len: int) -> Callable:
  """fn(params {teacher, proxy[, student]}, batch, scalars) -> per-batch sums over response slots:
  {"kl/<est>", "top1/<est>", "entropy", "tokens"}. Jit it with the models' shardings."""
  models = {k: Transformer(c) for k, c in cfgs.items()}

  def fn(params, batch, scalars):
    hidden = {k: m.apply({"params": params[k]}, batch["inputs"], batch["positions"],
                         batch["segment_ids"], return_hidden=True) for k, m in models.items()}
    heads = {k: lm_head_kernel(params[k], cfgs[k]) for k in models}
    b, t = batch["inputs"].shape
    c = chunk_len if t % chunk_len == 0 else t
    mask = (batch["loss_mask"] > 0) & (batch["doc"] >= 0)

    def chunked(x):  # [B, T, ...] -> [T / c, B * c, ...]
      x = x.reshape(b, t // c, c, *x.shape[2:])
      return jnp.moveaxis(x, 1, 0).reshape(t // c, b * c, *x.shape[3:])

    xs = {"h": {k: chunked(h) for k, h in hidden.items()}, "labels": chunked(batch["targets"]),
          "mask": chunked(mask), **{k: chunked(batch[k]) for k in PRIOR_KEYS}}

    def one(x):
      logits = {k: jnp.einsum("ne,ev->nv", h, heads[k].astype(h.dtype), preferred_element_type=jnp.float32)
                for k, h in x["h"].items()}
      prior = posterior.Prior(x["prior_ids"], x["prior_probs"], x["prior_rest"])
      est, entropy = chunk_estimates(logits["teacher"], logits["proxy"], logits.get("student"), prior,
                                     x["labels"], scalars)
      w = x["mask"]
      total = lambda v: jnp.sum(jnp.where(w, v, 0).astype(jnp.float32))
      sums = {f"kl/{k}": total(kl) for k, (kl, _) in est.items()}
      sums.update({f"top1/{k}": total(top1) for k, (_, top1) in est.items()})
      sums.update(entropy=total(entropy), tokens=total(jnp.ones_like(entropy)))
      return sums

    return jax.tree.map(lambda x: jnp.sum(x, axis=0), jax.lax.map(one, xs))

  return fn


def run(step: Callable, rows: Rows, feature: Callable[[dict], dict], global_batch: int,
        host: batches.HostSlice | None = None) -> dict[str, Any]:
  """Sum `step(batch)` (the jitted fn with params and scalars bound) over all `rows` in fixed
  batches, the prior `feature` added on the host -> {estimates: {name: {kl, top1}}, entropy,
  tokens}."""
  arrays = {k: rows.arrays[k] for k in ROW_KEYS}
  host_rows = host.rows if host is not None else None
  totals: dict[str, float] = {}
  for local in batches.fixed_batches(arrays, global_batch, host_rows, [feature]):
    batch = host.assemble(local) if host is not None else local
    for k, v in jax.device_get(step(batch)).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  n = max(totals.get("tokens", 0.0), 1.0)
  # An estimate that is undefined here (posterior_no_label with kappa = m = 0) sums to NaN: left out.
  names = [k.split("/", 1)[1] for k, v in totals.items() if k.startswith("kl/") and not np.isnan(v)]
  return {"estimates": {e: {"kl": totals[f"kl/{e}"] / n, "top1": totals[f"top1/{e}"] / n}
                        for e in ESTIMATES if e in names},
          "teacher_entropy": totals.get("entropy", 0.0) / n, "tokens": int(totals.get("tokens", 0))}


def teacher_sampling(records: Sequence[dict]) -> tuple[float, float]:
  """The one (temperature, top_p) the records were sampled with; ValueError if they differ."""
  def value(r, key):
    v = r["teacher"].get(key)
    return 1.0 if v is None else float(v)  # OpenAI's defaults
  seen = {(value(r, "temperature"), value(r, "top_p")) for r in records}
  if len(seen) != 1:
    raise ValueError(f"the held-out records were sampled with several (temperature, top_p): "
                     f"{sorted(seen)}; set config.fidelity.temperature and top_p")
  return seen.pop()


def scalars(**values: float) -> dict[str, np.ndarray]:
  """The traced scalars of the fidelity fn (SCALARS), float32."""
  missing = sorted(set(SCALARS) - set(values))
  if missing:
    raise ValueError(f"missing fidelity scalars {missing}")
  return {k: np.float32(values[k]) for k in SCALARS}
