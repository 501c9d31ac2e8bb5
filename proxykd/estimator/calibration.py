"""Calibration of the estimator by empirical Bayes (METHOD.md Stage 2): choose (kappa, m, tau,
n-gram order, smoothing) to maximise the log-likelihood of held-out teacher tokens under the
estimate WITHOUT the label, p_hat = (kappa pi + m q_tau) / (kappa + m).

One proxy forward per held-out batch serves the whole grid: it yields log q_tau(y) for every tau
(and log q_tau at the teacher's mapped top-k ids); the prior yields log pi(y) for every (order,
smoothing); each (kappa, m) is then a cheap elementwise mixture of the two (posterior.label_logprob,
the kernel's own mixture).

What this criterion can and cannot identify. Without the label the estimate depends on kappa and m
only through lambda = m / (kappa + m): settings with the same ratio score exactly the same, so the
held-out likelihood picks lambda, tau, order and smoothing, not the scale kappa + m, which decides
how much the label itself weighs in the training target, 1 / (kappa + m + 1). Among settings tied
at the best score the scale is chosen by the teacher's own top-k log-probabilities where the
held-out records carry them: the cross-entropy, at the positions they cover, between the teacher's
top-k (plus one bucket for the rest) and p_hat WITH the label, the target training would use
(`teacher_ce`). Without them the largest tied scale is kept (the least weight on the single
observed token: the loss has the label's NLL term already).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from proxykd.estimator import posterior

TIE = 1e-9  # relative difference of nats/token below which two settings tie


# ---------------------------------------------------------------------------------- the proxy
def proxy_stats(taus: Sequence[float], chunk_len: int = 256, teacher_k: int = 0):
  """A scoring statistic (proxykd/train/scoring.py Scorer `stats`): per slot, log q_tau(target)
  for every tau ("logq" [B, T, n_tau]) and, with `teacher_k`, log q_tau at the batch's
  `teacher_ids` ("logq_teacher" [B, T, n_tau, k]; -inf where the id is -1). The lm_head is applied
  chunk by chunk: at most B x chunk_len x V float32 logits at once."""
  taus = tuple(float(t) for t in taus)

  def stats(hidden, kernel, batch):
    b, t, _ = hidden.shape
    c = max(1, min(chunk_len, t))
    n = -(-t // c)
    pad = n * c - t

    def chunks(x):
      x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
      return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

    def one(args):
      h, y, tid = args
      logits = jnp.einsum("bce,ev->bcv", h, kernel.astype(h.dtype),
                          preferred_element_type=jnp.float32)
      at_y, at_t = [], []
      for tau in taus:
        z = logits / tau
        lse = jax.nn.logsumexp(z, axis=-1)
        at_y.append(jnp.take_along_axis(z, y[..., None], axis=-1)[..., 0] - lse)
        if teacher_k:
          picked = jnp.take_along_axis(z, jnp.maximum(tid, 0), axis=-1) - lse[..., None]
          at_t.append(jnp.where(tid >= 0, picked, -jnp.inf))
      out = {"logq": jnp.stack(at_y, axis=-1)}
      if teacher_k:
        out["logq_teacher"] = jnp.stack(at_t, axis=-2)
      return out

    tid = batch["teacher_ids"] if teacher_k else jnp.zeros((b, t, 1), jnp.int32)
    out = jax.lax.map(one, (chunks(hidden), chunks(batch["targets"].astype(jnp.int32)),
                            chunks(tid.astype(jnp.int32))))
    return {k: jnp.moveaxis(v, 0, 1).reshape(b, n * c, *v.shape[3:])[:, :t] for k, v in out.items()}

  return stats


# ---------------------------------------------------------------------------------- the grid
@dataclasses.dataclass(frozen=True)
class Setting:
  order: int
  smoothing: str
  tau: float
  kappa: float
  m: float

  @property
  def family(self) -> str:
    """Which estimate the setting is without the label: prior-only, proxy-only or a mixture."""
    if math.isinf(self.m) or (self.kappa == 0 and self.m > 0):
      return "proxy"
    if self.m == 0:
      return "prior"
    return "posterior"

  @property
  def scale(self) -> float:
    return self.kappa + self.m

  def to_dict(self) -> dict[str, Any]:
    return {"order": self.order, "smoothing": self.smoothing, "tau": self.tau,
            "kappa": self.kappa, "m": json_number(self.m), "family": self.family}


def json_number(x: float) -> float:
  """A float for json.dumps: m = inf is written `Infinity`, which Python's json (and the stages
  reading chosen.json) read back as float("inf")."""
  return float(x)


def grid(orders, smoothings, taus, kappas, ms) -> list[Setting]:
  """Every combination, less the one without anything to mix (kappa = m = 0)."""
  out = []
  for order, sm, tau, kappa, m in itertools.product(orders, smoothings, taus, kappas, ms):
    if kappa == 0 and m == 0:
      continue
    out.append(Setting(int(order), str(sm), float(tau), float(kappa), float(m)))
  return out


@jax.jit
def _mean_logprob(log_pi_y, log_q_y, kappas, ms):
  """mean over positions of log p_hat(y) without the label, per (kappa, m) pair."""
  per = jax.vmap(lambda k, m: jnp.mean(posterior.label_logprob(log_pi_y, log_q_y, k, m, False)))
  return per(kappas, ms)


def score_grid(settings: Sequence[Setting], log_pi_y: dict[tuple[int, str], np.ndarray],
               log_q_y: dict[float, np.ndarray]) -> np.ndarray:
  """nats/token (the negative mean log-likelihood) of every setting. `log_pi_y[(order,
  smoothing)]` and `log_q_y[tau]`: [n] at the same held-out positions."""
  out = np.empty(len(settings))
  groups: dict[tuple, list[int]] = {}
  for i, s in enumerate(settings):
    groups.setdefault((s.order, s.smoothing, s.tau), []).append(i)
  for (order, sm, tau), idx in groups.items():
    kappas = jnp.asarray([settings[i].kappa for i in idx], jnp.float32)
    ms = jnp.asarray([settings[i].m for i in idx], jnp.float32)
    out[idx] = -np.asarray(_mean_logprob(jnp.asarray(log_pi_y[(order, sm)]),
                                         jnp.asarray(log_q_y[tau]), kappas, ms), np.float64)
  return out


# ------------------------------------------------------------------------- the teacher's top-k
@dataclasses.dataclass
class TeacherEvidence:
  """At the held-out positions the teacher's top-k covers: its mapped ids and log-probs, and pi
  and q_tau there, for the scale criterion and the override score."""
  ids: np.ndarray  # [n, kt] (-1: none)
  logprobs: np.ndarray  # [n, kt]
  labels: np.ndarray  # [n]
  log_pi: dict[tuple[int, str], np.ndarray]  # [n, kt] per prior variant
  log_q: dict[float, np.ndarray]  # [n, kt] per tau

  def __len__(self) -> int:
    return len(self.labels)


def teacher_ce(ev: TeacherEvidence, s: Setting) -> float:
  """Mean cross-entropy (nats) from the teacher's top-k, plus one bucket for the rest of its mass,
  to p_hat WITH the label under setting s (the training target)."""
  valid = ev.ids >= 0
  w = posterior.weights(s.kappa, s.m, include_label=True)
  log_p = np.asarray(posterior.mix(jnp.asarray(ev.log_pi[(s.order, s.smoothing)]),
                                   jnp.asarray(ev.log_q[s.tau]),
                                   jnp.asarray(ev.ids == ev.labels[:, None]), w), np.float64)
  t = np.where(valid, np.exp(ev.logprobs.astype(np.float64)), 0.0)
  p_s = np.where(valid, np.exp(log_p), 0.0).sum(1)
  rest_t = np.clip(1.0 - t.sum(1), 0.0, 1.0)
  ce = -np.sum(np.where(valid, t * np.where(valid, log_p, 0.0), 0.0), axis=1)
  ce -= np.where(rest_t > 0, rest_t * np.log(np.clip(1.0 - p_s, 1e-30, 1.0)), 0.0)
  return float(ce.mean())


def override_logprob(ev: TeacherEvidence, log_p_y: np.ndarray, s: Setting) -> np.ndarray:
  """log p_hat(y) WITHOUT the label after the teacher top-k override, at the covered positions:
  T(y) if y is one of the teacher's ids, else (1 - sum T) p_hat(y) / (1 - p_hat(S))."""
  valid = ev.ids >= 0
  w = posterior.weights(s.kappa, s.m, include_label=False)
  log_p = np.asarray(posterior.mix(jnp.asarray(ev.log_pi[(s.order, s.smoothing)]),
                                   jnp.asarray(ev.log_q[s.tau]), jnp.zeros(ev.ids.shape, bool), w),
                     np.float64)
  p_s = np.where(valid, np.exp(log_p), 0.0).sum(1)
  t = np.where(valid, np.exp(ev.logprobs.astype(np.float64)), 0.0)
  hit = valid & (ev.ids == ev.labels[:, None])
  in_s = hit.any(1)
  t_y = np.where(hit, ev.logprobs, 0.0).sum(1)
  with np.errstate(divide="ignore"):
    outside = np.log(np.clip(1.0 - t.sum(1), 0.0, 1.0)) + log_p_y - np.log(np.clip(1.0 - p_s, 1e-30, 1.0))
  return np.where(in_s, t_y, outside)


# ---------------------------------------------------------------------------------- the choice
def choose(settings: Sequence[Setting], nats: np.ndarray, evidence: TeacherEvidence | None = None
           ) -> tuple[int, dict[str, Any]]:
  """(index of the chosen setting, how it was chosen). The best nats/token decides lambda, tau,
  order and smoothing; ties (equal scores: the same m / (kappa + m)) are broken by the teacher's
  top-k cross-entropy with the label when there is evidence, else by the largest kappa + m."""
  best = float(np.min(nats))
  tied = [i for i in range(len(settings)) if nats[i] <= best + TIE * max(abs(best), 1.0)]
  how: dict[str, Any] = {"tied": len(tied)}
  if len(tied) > 1 and evidence is not None and len(evidence):
    ce = {i: teacher_ce(evidence, settings[i]) for i in tied}
    pick = min(tied, key=lambda i: (ce[i], -settings[i].scale))
    how.update(rule="teacher top-k cross-entropy with the label (lowest)",
               teacher_ce=[{"kappa": settings[i].kappa, "m": json_number(settings[i].m),
                            "teacher_ce": ce[i]} for i in tied])
  else:
    pick = max(tied, key=lambda i: (settings[i].scale, settings[i].kappa))
    how["rule"] = "best score" if len(tied) == 1 else "largest kappa + m among the tied"
  return pick, how


def best_of(settings: Sequence[Setting], nats: np.ndarray, family: str) -> int | None:
  idx = [i for i, s in enumerate(settings) if s.family == family]
  return min(idx, key=lambda i: nats[i]) if idx else None


# ---------------------------------------------------------------------------------- reporting
def format_table(settings: Sequence[Setting], nats: np.ndarray, chosen: int,
                 families: dict[str, int | None], extra: dict[str, float] | None = None) -> str:
  """The printed summary: best per family, the chosen setting, and nats/token over kappa x m at
  the chosen order, smoothing and tau."""
  lines = ["nats/token of held-out teacher tokens (estimate without the label):"]
  for name, i in families.items():
    if i is not None:
      s = settings[i]
      what = {"prior": f"order={s.order} smoothing={s.smoothing}", "proxy": f"tau={s.tau:g}"}.get(
          s.family, f"order={s.order} smoothing={s.smoothing} tau={s.tau:g} kappa={s.kappa:g} "
          f"m={s.m:g}")
      lines.append(f"  {name:<14} {nats[i]:8.4f}   {what}")
  for name, value in (extra or {}).items():
    lines.append(f"  {name:<14} {value:8.4f}")
  c = settings[chosen]
  lines.append(f"chosen: kappa={c.kappa:g} m={c.m:g} tau={c.tau:g} order={c.order} "
               f"smoothing={c.smoothing} ({nats[chosen]:.4f} nats/token)")
  at = [i for i, s in enumerate(settings)
        if (s.order, s.smoothing, s.tau) == (c.order, c.smoothing, c.tau)]
  kappas = sorted({settings[i].kappa for i in at})
  ms = sorted({settings[i].m for i in at})
  cell = {(settings[i].kappa, settings[i].m): nats[i] for i in at}
  lines.append(f"at order={c.order} smoothing={c.smoothing} tau={c.tau:g}:")
  lines.append("  kappa \\ m " + "".join(f"{m:>9g}" for m in ms))
  for k in kappas:
    lines.append(f"  {k:>9g} " + "".join(f"{cell[(k, m)]:9.4f}" if (k, m) in cell else f"{'-':>9}"
                                         for m in ms))
  return "\n".join(lines)


def plot(settings: Sequence[Setting], nats: np.ndarray, chosen: int, path) -> None:
  """nats/token against m (log axis) for each kappa, at the chosen order, smoothing and tau; the
  prior-only (m = 0) and proxy-only (m = inf) scores as horizontal lines."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  c = settings[chosen]
  at = [i for i, s in enumerate(settings) if (s.order, s.smoothing, s.tau) == (c.order, c.smoothing, c.tau)]
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  for kappa in sorted({settings[i].kappa for i in at}):
    pts = sorted((settings[i].m, nats[i]) for i in at
                 if settings[i].kappa == kappa and 0 < settings[i].m < math.inf)
    if pts:
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"kappa={kappa:g}")
  prior = [nats[i] for i in at if settings[i].family == "prior"]
  proxy = [nats[i] for i in at if settings[i].family == "proxy"]
  if prior:
    ax.axhline(min(prior), color="gray", linestyle="--", label="prior only (m=0)")
  if proxy:
    ax.axhline(min(proxy), color="black", linestyle=":", label="proxy only (m=inf)")
  if 0 < c.m < math.inf:
    ax.plot([c.m], [nats[chosen]], marker="*", markersize=14, color="red", linestyle="none",
            label="chosen")
  ax.set_xscale("log")
  ax.set_xlabel("m (proxy pseudo-counts)")
  ax.set_ylabel("held-out nats/token")
  ax.set_title(f"order {c.order}, {c.smoothing}, tau={c.tau:g}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(str(path))
  plt.close(fig)
