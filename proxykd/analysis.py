"""One teacher response, token by token: what the corpus prior, the aligned proxy, the posterior
estimate and the students put at each of its positions (notebooks/analysis.ipynb).

Everything is computed the way the stages compute it, from a finished run directory:
- the held-out split from the distilled student's recorded config (`<run>/student_kd/config.json`,
  proxykd/stages/inputs.py `load_split`), tokenised and packed as its rows are
  (proxykd/data/pipeline.py `build_rows`), with the teacher's own top-k log-probabilities as
  per-token features where the records carry them (proxykd/estimator/teacher_topk.py);
- the prior pi from `<run>/prior` at the calibrated order, smoothing and floor, queried as held-out
  rows (proxykd/estimator/features.py `PriorFeature`, corpus_rows=False: no leave-one-out);
- the aligned proxy (`inputs.proxy_ref`) and its tempered distribution q = softmax(z / tau);
- the posterior p_hat = (kappa pi + e_y + m q) / (kappa + 1 + m) from the one kernel the student's
  loss uses (proxykd/estimator/posterior.py `posterior_logprobs`), with the student's kappa, m, tau
  (`<run>/calibrate/chosen.json` unless its config overrode them);
- the students from their checkpoints, and the distilled student's initial weights.

`inspect_record` returns, for each distribution, its top tokens at every response position and
the log-probability it gives the teacher's token there; `plot_top_tokens` and `plot_teacher_token`
draw them (PNG files, so they show the same in Colab, Jupyter and a headless run).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from proxykd.data import packing, pipeline
from proxykd.estimator import features, posterior, store
from proxykd.estimator import weights as sample_weights
from proxykd.estimator.prior import PriorView
from proxykd.estimator.teacher_topk import TeacherFeatures
from proxykd.models import checkpoint
from proxykd.models.config import ModelConfig
from proxykd.models.tokenizer import load_tokenizer
from proxykd.models.transformer import Transformer

Model = tuple[Any, ModelConfig]  # (params, config)
ESTIMATOR_KEYS = ("kappa", "m", "tau", "order", "smoothing", "floor")


@dataclasses.dataclass
class RunView:
  """What the analysis reads from a finished run directory."""
  workdir: epath.Path
  config: ml_collections.ConfigDict  # the distilled student's recorded config
  tokenizer: Any
  estimator: dict[str, Any]  # ESTIMATOR_KEYS: the estimator the student was distilled with
  heldout: list[dict]  # the held-out teacher records, in corpus order


def open_run(workdir: epath.PathLike, student: str = "student_kd") -> RunView:
  """The run in `workdir` as `student` (a student_kd run directory in it) saw it: its config,
  tokenizer, estimator settings and the held-out split under its recorded split config."""
  # pylint: disable=g-import-not-at-top  (the stage modules pull in the trainer)
  from proxykd.stages import inputs
  from proxykd.stages.student_kd import estimator_settings
  workdir = epath.Path(workdir)
  path = workdir / student / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: is {workdir} a finished demo run?")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  tokenizer = load_tokenizer(inputs.tokenizer_dir(config, workdir))
  settings = estimator_settings(config, workdir)
  estimator = {k: settings[k] for k in ESTIMATOR_KEYS if k in settings}
  _, heldout, _ = inputs.load_split(config, workdir)
  return RunView(workdir, config, tokenizer, estimator, heldout)


def proxy_model(run: RunView) -> Model:
  """The aligned proxy the student was distilled from (proxy_dpo's final, else config.proxy)."""
  from proxykd.stages import inputs  # pylint: disable=g-import-not-at-top
  return inputs.model_for_inference(inputs.proxy_ref(run.config, run.workdir), None)


def student_model(run: RunView, name: str) -> Model:
  """The last checkpoint of the student run `<workdir>/<name>` (LoRA merged)."""
  params, cfg, _ = checkpoint.restore_for_inference(run.workdir / name / "checkpoints")
  return params, cfg


def initial_student(run: RunView) -> Model:
  """The distilled student's weights before training: `config.init_from`, or the random init its
  `config.train.seed` gave (the one checkpoint.load_params made for the trainer)."""
  from proxykd.train import trainer  # pylint: disable=g-import-not-at-top
  ref = trainer.weights_ref(run.config)
  cfg = trainer.model_config(run.config, ref)
  return checkpoint.load_params(ref, cfg), cfg


def rows_of(run: RunView, records: Sequence[dict], teacher_topk: int = 0) -> packing.Rows:
  """The records tokenised and packed as the student's rows (in order, not shuffled); with
  `teacher_topk` > 0 and records carrying logprobs, the teacher's top-k as `teacher_ids` and
  `teacher_logp` features."""
  records = list(records)
  teacher = None
  if teacher_topk > 0 and any(r.get("logprobs") for r in records):
    teacher = TeacherFeatures(records, run.tokenizer, teacher_topk, run.config.data.length_policy)
  rows, _ = pipeline.build_rows(records, run.tokenizer, run.config.data, shuffle=False,
                                transform=teacher, transform_key=teacher.key if teacher else "")
  return rows


@functools.lru_cache(maxsize=8)
def _forward(cfg: ModelConfig):
  model = Transformer(cfg)
  return jax.jit(lambda params, tokens, positions, segments: model.apply(
      {"params": params}, tokens, positions, segments))


def logits(model: Model, rows: packing.Rows, batch: int = 16) -> np.ndarray:
  """The model's logits [rows, T, V] (float32) over packed rows (documents never see each other)."""
  params, cfg = model
  fn, a = _forward(cfg), rows.arrays
  out = [np.asarray(fn(params, a["inputs"][lo:lo + batch], a["positions"][lo:lo + batch],
                       a["segment_ids"][lo:lo + batch]))
         for lo in range(0, len(rows), batch)]
  return np.concatenate(out)


def response_logprobs(model: Model, rows: packing.Rows) -> np.ndarray:
  """log p(target) [rows, T] under the model at every slot (meaningful where loss_mask > 0)."""
  z = jnp.asarray(logits(model, rows))
  logp = jax.nn.log_softmax(z, axis=-1)
  return np.asarray(jnp.take_along_axis(logp, jnp.asarray(rows.arrays["targets"])[..., None],
                                        axis=-1)[..., 0])


def record_nll(models: dict[str, Model], rows: packing.Rows
               ) -> tuple[list[str], dict[str, np.ndarray]]:
  """(record ids, {name: mean NLL per record over its response tokens, nats/token}) of every
  model over the same packed rows."""
  ids, out = None, {}
  a = rows.arrays
  for name, model in models.items():
    ids, mean = sample_weights.per_record_mean_logp(response_logprobs(model, rows), a["loss_mask"],
                                                    a["doc"], rows.docs)
    out[name] = -mean
  return list(ids or []), out


def prior_view(run: RunView, vocab_size: int) -> PriorView:
  """The prior as the student's loss queried it: calibrated order, smoothing and floor, the
  student's kd.prior_k tokens per position."""
  d = epath.Path(run.config.get("prior") or run.workdir / "prior")
  counts, _ = store.load(d, run.tokenizer, "the run's tokenizer", run.config.data.length_policy)
  e = run.estimator
  return PriorView(counts, order=int(e.get("order", counts.max_order)),
                   smoothing=e.get("smoothing", "wb"), k=int(run.config.kd.prior_k),
                   vocab_size=vocab_size, floor=float(e.get("floor", 1e-6)))


def token_texts(tokenizer, ids: Sequence[int]) -> dict[int, str]:
  """Each id's text as it reads inside a text (decoded after an anchor token, so SentencePiece's
  leading-space stripping does not apply), whitespace and control characters made visible:
  ' ' -> '·', newline -> '↵', tab -> '→', other unprintables as \\xNN."""
  anchor = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("a"))[0]
  base = tokenizer.decode([anchor])
  known = sorted({int(i) for i in ids if 0 <= int(i) < len(tokenizer)})
  decoded = tokenizer.batch_decode([[anchor, i] for i in known], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
  out = {int(i): f"<{int(i)}>" for i in ids}  # ids past the tokenizer (padded vocabulary)
  for i, d in zip(known, decoded):
    text = d[len(base):] if d.startswith(base) else d
    out[i] = "".join(_VISIBLE.get(c, c if c.isprintable() else f"\\x{ord(c):02x}")
                     for c in text) or "∅"
  return out


_VISIBLE = {" ": "·", "\n": "↵", "\t": "→"}


@dataclasses.dataclass
class Inspection:
  """One response, position by position (n = its response tokens in the packed row)."""
  record_id: str
  labels: np.ndarray  # [n] the teacher's tokens (ids)
  top: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (ids [n, k], probs [n, k]), best first
  label_logprob: dict[str, np.ndarray]  # name -> log p(teacher's token) [n]
  texts: dict[int, str]  # id -> display text of every id above
  settings: dict[str, Any]  # the estimator's kappa, m, tau, ...

  @property
  def tokens(self) -> list[str]:
    return [self.texts[int(i)] for i in self.labels]

  def nll(self) -> dict[str, float]:
    """Mean NLL of the teacher's tokens (nats/token) under each distribution that has them all."""
    return {k: float(-v.mean()) for k, v in self.label_logprob.items() if np.isfinite(v).all()}


def _top(log_p: jax.Array, k: int) -> tuple[np.ndarray, np.ndarray]:
  values, ids = jax.lax.top_k(log_p, k)
  return np.asarray(ids, np.int32), np.exp(np.asarray(values, np.float64))


def _at(log_p: jax.Array, labels: np.ndarray) -> np.ndarray:
  return np.asarray(jnp.take_along_axis(log_p, jnp.asarray(labels)[:, None], axis=-1)[:, 0],
                    np.float64)


def inspect_record(run: RunView, record: dict, proxy: Model, students: dict[str, Model],
                   k: int = 5) -> Inspection:
  """Every distribution at each response position of `record` (a held-out record: the prior is
  queried without leave-one-out, and refuses a record it counted).

  `top` holds "teacher" (the teacher's own top-k log-probabilities mapped to our tokens, where the
  record has them; zero probability where a position has none), "prior" (pi), "proxy" (q at the
  calibrated tau), "posterior" (p_hat with the teacher's token: the distillation target, before
  any teacher top-k override) and "estimate" (p_hat without the teacher's token, (kappa pi + m q) /
  (kappa + m): the estimator's prediction of it, what calibration scores). `label_logprob` holds
  the same for prior, proxy, posterior and estimate, each student's, and "teacher" (its reported
  log-probability where its top-k covers the token, NaN elsewhere).
  """
  kt = int(run.config.kd.get("teacher_topk", 0))
  rows = rows_of(run, [record], teacher_topk=kt)
  a = rows.arrays
  valid = a["loss_mask"] > 0
  labels = a["targets"][valid].astype(np.int32)
  z = jnp.asarray(logits(proxy, rows)[valid])
  vocab = z.shape[-1]
  feats = features.PriorFeature(prior_view(run, vocab), rows.docs, corpus_rows=False)(a)
  prior = posterior.Prior(*(jnp.asarray(feats[key][valid]) for key in features.KEYS))
  e = run.estimator
  kappa, m, tau = float(e["kappa"]), float(e["m"]), float(e["tau"])
  log_pi = posterior.dense_log_prior(prior, vocab)
  log_q = jax.nn.log_softmax(z / tau, axis=-1)
  target = posterior.posterior_logprobs(z, prior, labels, kappa, m, tau, include_label=True)
  top = {"prior": _top(log_pi, k), "proxy": _top(log_q, k), "posterior": _top(target, k)}
  at = {"prior": _at(log_pi, labels), "proxy": _at(log_q, labels), "posterior": _at(target, labels)}
  if kappa + m > 0:  # without the label, kappa = m = 0 leaves nothing to mix
    estimate = posterior.posterior_logprobs(z, prior, labels, kappa, m, tau, include_label=False)
    top["estimate"], at["estimate"] = _top(estimate, k), _at(estimate, labels)
  if "teacher_ids" in a:
    t_ids, t_lp = a["teacher_ids"][valid], a["teacher_logp"][valid]
    order = np.argsort(-np.where(t_ids >= 0, t_lp, -np.inf), axis=-1, kind="stable")[:, :k]
    ids_k = np.take_along_axis(t_ids, order, axis=-1)
    probs_k = np.where(ids_k >= 0, np.exp(np.take_along_axis(t_lp, order, axis=-1)), 0.0)
    if ids_k.shape[1] < k:
      pad = k - ids_k.shape[1]
      ids_k = np.pad(ids_k, ((0, 0), (0, pad)), constant_values=-1)
      probs_k = np.pad(probs_k, ((0, 0), (0, pad)))
    top = {"teacher": (ids_k, probs_k), **top}
    hit = t_ids == labels[:, None]
    at["teacher"] = np.where(hit.any(-1), np.sum(np.where(hit, t_lp, 0.0), -1), np.nan)
  for name, model in students.items():
    at[name] = response_logprobs(model, rows)[valid].astype(np.float64)
  shown = [labels] + [ids[ids >= 0] for ids, _ in top.values()]
  texts = token_texts(run.tokenizer, np.concatenate([s.ravel() for s in shown]).tolist())
  return Inspection(record["id"], labels, top, at, texts, dict(e))


def _plt():
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path: epath.PathLike | None) -> None:
  fig.tight_layout()
  if path is not None:
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    with epath.Path(path).open("wb") as f:
      fig.savefig(f, format="png")


def plot_top_tokens(insp: Inspection, path: epath.PathLike | None = None, k: int = 3,
                    start: int = 0, count: int = 40,
                    groups: Sequence[str] = ("teacher", "prior", "proxy", "posterior")):
  """A heat map: one row per response position (labelled with the teacher's token), for each
  distribution in `groups` its top `k` tokens (cell text) coloured by their probability; a cell
  holding the teacher's token is framed. Returns the figure (closed; written to `path` if given)."""
  groups = [g for g in groups if g in insp.top]
  stop = min(start + count, len(insp.labels))
  n = stop - start
  values = np.full((n, len(groups) * k), np.nan)
  plt = _plt()
  fig, ax = plt.subplots(figsize=(1.0 * len(groups) * k + 1.6, 0.26 * n + 1.4), dpi=100)
  for g, name in enumerate(groups):
    ids, probs = insp.top[name]
    for r in range(n):
      for j in range(min(k, ids.shape[1])):
        tok = int(ids[start + r, j])
        if tok < 0:
          continue
        c = g * k + j
        values[r, c] = probs[start + r, j]
        ax.text(c, r, insp.texts[tok][:8], ha="center", va="center", fontsize=7,
                color="white" if probs[start + r, j] < 0.55 else "black")
        if tok == int(insp.labels[start + r]):
          ax.add_patch(_plt().Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red",
                                        linewidth=1.2))
  image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto",
                    interpolation="nearest")
  ax.set_yticks(range(n))
  ax.set_yticklabels([f"{start + r:3d} {insp.tokens[start + r][:10]}" for r in range(n)],
                     fontsize=7, family="monospace")
  ax.set_xticks([g * k + (k - 1) / 2 for g in range(len(groups))])
  ax.set_xticklabels(groups, fontsize=9)
  ax.xaxis.tick_top()
  for g in range(1, len(groups)):
    ax.axvline(g * k - 0.5, color="white", linewidth=2)
  ax.set_ylabel("position: the teacher's token")
  fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="probability")
  _save(fig, path)
  plt.close(fig)
  return fig


def plot_teacher_token(insp: Inspection, names: Sequence[str], path: epath.PathLike | None = None,
                       start: int = 0, count: int = 60):
  """A heat map of the probability each distribution in `names` gives the teacher's token at
  every position (columns, labelled with the token); each row's label carries its mean NLL over
  the whole response. Grey: no value there (e.g. the teacher's top-k did not cover the token)."""
  names = [n for n in names if n in insp.label_logprob]
  stop = min(start + count, len(insp.labels))
  values = np.stack([np.exp(insp.label_logprob[n][start:stop]) for n in names])
  plt = _plt()
  fig, ax = plt.subplots(figsize=(0.2 * (stop - start) + 3.0, 0.42 * len(names) + 1.6), dpi=100)
  cmap = plt.get_cmap("magma").with_extremes(bad="lightgrey")
  image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                    interpolation="nearest")
  nll = insp.nll()
  ax.set_yticks(range(len(names)))
  ax.set_yticklabels([f"{n} ({nll[n]:.3f} nats/token)" if n in nll else n for n in names],
                     fontsize=8)
  ax.set_xticks(range(stop - start))
  ax.set_xticklabels([t[:8] for t in insp.tokens[start:stop]], rotation=90, fontsize=7,
                     family="monospace")
  ax.set_xlabel(f"the teacher's tokens {start}..{stop - 1}")
  fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label="p(teacher's token)")
  _save(fig, path)
  plt.close(fig)
  return fig


def plot_record_nll(nll: dict[str, np.ndarray], before: str, after: str,
                    path: epath.PathLike | None = None, marked: int | None = None):
  """Per-record NLL of the teacher's response under `before` (x) and `after` (y), one point per
  held-out record (below the diagonal: `after` is closer to the teacher there); the record at
  index `marked` is circled. Returns the figure (closed; written to `path` if given)."""
  x, y = np.asarray(nll[before]), np.asarray(nll[after])
  plt = _plt()
  fig, ax = plt.subplots(figsize=(4.8, 4.4), dpi=100)
  ax.scatter(x, y, s=14, alpha=0.7)
  lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
  ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1, linestyle="--")
  if marked is not None:
    ax.scatter([x[marked]], [y[marked]], s=120, facecolors="none", edgecolors="red", linewidths=1.5,
               label="the response inspected below")
    ax.legend(fontsize=8, loc="upper left")
  better = float(np.mean(y < x))
  ax.set(xlabel=f"{before}: NLL (nats/token)", ylabel=f"{after}: NLL (nats/token)",
         title=f"{after} lower on {better:.0%} of {len(x)} responses")
  _save(fig, path)
  plt.close(fig)
  return fig
