"""The report's PNG plots (matplotlib, Agg): one function per figure, each returning whether it had
anything to draw (a figure without data is not written)."""
from __future__ import annotations

import math
from typing import Sequence

from etils import epath

from proxykd.eval.report import FIDELITY_ROWS, Run

LOSS_TAGS = ("train/loss", "eval/loss")
PIPELINE = ("proxy_sft", "proxy_dpo", "student_kd", "student_sft")  # panels first, in this order


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path: epath.PathLike) -> None:
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, format="png")
  epath.Path(path).write_bytes(buf.getvalue())


def training_curves(runs: Sequence[Run], path) -> bool:
  """One panel per training stage: train/loss (solid) and eval/loss (dashed) against the step."""
  stages = sorted({s for r in runs for s, c in r.curves.items() if any(t in c for t in LOSS_TAGS)},
                  key=lambda s: (PIPELINE.index(s) if s in PIPELINE else len(PIPELINE), s))
  if not stages:
    return False
  plt = _plt()
  fig, axes = plt.subplots(1, len(stages), figsize=(4.6 * len(stages), 3.6), dpi=110, squeeze=False)
  for ax, stage in zip(axes[0], stages):
    for i, r in enumerate(runs):
      curves = r.curves.get(stage, {})
      for tag, style in zip(LOSS_TAGS, ("-", "--")):
        pts = curves.get(tag)
        if pts:
          ax.plot([s for s, _ in pts], [v for _, v in pts], style, color=f"C{i}",
                  label=f"{r.name} {tag.split('/')[0]}", marker="." if len(pts) < 30 else None)
    ax.set_title(stage)
    values = [v for r in runs for t in LOSS_TAGS for _, v in r.curves.get(stage, {}).get(t, [])]
    if values and min(values) > 0 and max(values) / min(values) > 20:
      ax.set_yscale("log")  # e.g. NLL + alpha KL in training against the held-out NLL
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
  _save(fig, path)
  plt.close(fig)
  return True


def dpo_rounds(runs: Sequence[Run], path) -> bool:
  """Held-out top-1 agreement with the teacher and NLL of the proxy after each DPO round."""
  with_rounds = [r for r in runs if r.dpo_rounds]
  if not with_rounds:
    return False
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(9.2, 3.6), dpi=110)
  for i, r in enumerate(runs):
    rows = sorted(r.dpo_rounds, key=lambda x: x["round"])
    if not rows:
      continue
    k = [x["round"] for x in rows]
    for ax, key in zip(axes, ("heldout_top1", "heldout_nll")):
      ax.plot(k, [x.get(key, math.nan) for x in rows], marker="o", color=f"C{i}", label=r.name)
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top
  for ax, title in zip(axes, ("held-out top-1 agreement", "held-out NLL (nats/token)")):
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("DPO round (0 = warm-up proxy)")
    ax.set_title(title)
    ax.legend(fontsize=7)
  _save(fig, path)
  plt.close(fig)
  return True


def calibration(runs: Sequence[Run], path) -> bool:
  """Held-out nats/token against m at each run's chosen order, smoothing, tau and kappa; the best
  prior-only (m = 0) and proxy-only (m = inf) scores dashed and dotted."""
  drawn = False
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
  for i, r in enumerate(runs):
    table = r.calibration or {}
    chosen = table.get("chosen") or {}
    same = lambda s: all(s.get(k) == chosen.get(k) for k in ("order", "smoothing", "tau", "kappa"))
    pts = sorted((float(s["m"]), float(s["nats_per_token"])) for s in table.get("settings", [])
                 if same(s) and 0 < float(s["m"]) < math.inf)
    if not pts:
      continue
    drawn = True
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}",
            label=f"{r.name} (kappa={chosen.get('kappa')})")
    best = table.get("best") or {}
    for fam, style in (("prior only", "--"), ("proxy only", ":")):
      b = best.get(fam)
      if b:
        ax.axhline(float(b["nats_per_token"]), color=f"C{i}", linestyle=style, linewidth=1,
                   label=f"{r.name} {fam}")
    if 0 < float(chosen.get("m", 0)) < math.inf:
      ax.plot([float(chosen["m"])], [float(chosen["nats_per_token"])], marker="*", markersize=12,
              color=f"C{i}", linestyle="none")
  if drawn:
    ax.set_xscale("log")
    ax.set_xlabel("m (proxy pseudo-counts)")
    ax.set_ylabel("held-out nats/token")
    ax.legend(fontsize=7)
    _save(fig, path)
  plt.close(fig)
  return drawn


def bbh_tasks(runs: Sequence[Run], path) -> bool:
  """Accuracy per BBH task, one bar per run."""
  per = {r.name: (((r.eval or {}).get("tasks") or {}).get("bbh") or {}).get("groups") or {} for r in runs}
  names = sorted({t for g in per.values() for t in g})
  if not names:
    return False
  plt = _plt()
  fig, ax = plt.subplots(figsize=(8.0, 0.28 * len(names) * max(1, len(runs)) + 1.5), dpi=110)
  width = 0.8 / max(len(runs), 1)
  for i, r in enumerate(runs):
    ys = [j + i * width for j in range(len(names))]
    ax.barh(ys, [per[r.name].get(t, {}).get("accuracy", 0.0) for t in names], height=width,
            color=f"C{i}", label=r.name)
  ax.set_yticks([j + 0.4 - width / 2 for j in range(len(names))])
  ax.set_yticklabels(names, fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel("accuracy")
  ax.set_xlim(0, 1)
  ax.legend(fontsize=7)
  _save(fig, path)
  plt.close(fig)
  return True


def fidelity(runs: Sequence[Run], path) -> bool:
  """KL(teacher || estimate) per token for each estimate, one bar per run."""
  def kl(r, row):
    f = ((r.eval or {}).get("tasks") or {}).get("fidelity") or {}
    v = (f.get("estimates") or {}).get(row, {}).get("kl")
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None
  rows = [row for row in FIDELITY_ROWS if any(kl(r, row) is not None for r in runs)]
  if not rows:
    return False
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
  width = 0.8 / max(len(runs), 1)
  for i, r in enumerate(runs):
    ax.bar([j + i * width for j in range(len(rows))], [kl(r, row) or 0.0 for row in rows],
           width=width, color=f"C{i}", label=r.name)
  ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
  ax.set_xticklabels(rows)
  ax.set_ylabel("KL(teacher ‖ ·), nats/token")
  ax.legend(fontsize=7)
  _save(fig, path)
  plt.close(fig)
  return True


FIGURES = {"training_curves": training_curves, "dpo_rounds": dpo_rounds, "calibration": calibration,
           "bbh_tasks": bbh_tasks, "fidelity": fidelity}
