"""Where training metrics go: a tqdm bar on the console, TensorBoard event files, a JSON-lines file
in the workdir, and Weights & Biases when `config.wandb.project` is set (optional import).

A resumed run continues from its checkpoint's step: `metrics.jsonl` is cut back to the lines of
steps up to that one and TensorBoard purges later events, so no step is ever recorded twice.

A logdir that is not local (gs://...) gets the same files through a local mirror
(proxykd/paths.py): metrics.jsonl is appended and the event files written locally, and the files
that changed are copied to the logdir at most every `sync_every_s` seconds (at a write) and when the
writer closes. A run killed outright leaves the remote copies up to `sync_every_s` behind. W&B
then keeps its local files in its default place (./wandb) rather than in the logdir.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
from etils import epath

from proxykd import paths
from proxykd.runner import redact


class MetricWriter:

  def __init__(self, logdir: epath.PathLike, total_steps: int, initial_step: int = 0,
               wandb_cfg=None, run_config: dict | None = None, console: bool = True,
               sync_every_s: float = 60.0):
    self.logdir = epath.Path(logdir)
    self.logdir.mkdir(parents=True, exist_ok=True)
    self.is_main = jax.process_index() == 0
    self._tb = self._wandb = self._bar = self._mirror = None
    self._jsonl = None
    self._sync_every_s, self._synced_at = sync_every_s, time.monotonic()
    if not self.is_main:
      return
    self._mirror = paths.LocalMirror(self.logdir, prefix="proxykd-metrics-")
    local = epath.Path(self._mirror.local)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.fspath(local / "tensorboard"),
                             purge_step=initial_step + 1 if initial_step else None)
    path = self.logdir / "metrics.jsonl"
    kept = _lines_up_to(path, initial_step) if path.exists() else ""
    (local / "metrics.jsonl").write_text(kept)
    self._jsonl = (local / "metrics.jsonl").open("a")
    if wandb_cfg is not None and wandb_cfg.get("project"):
      try:
        import wandb  # pylint: disable=g-import-not-at-top
      except ImportError:
        raise ImportError("config.wandb.project is set but the `wandb` package is not installed; "
                          "pip install wandb, or leave config.wandb.project empty") from None
      self._wandb = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.get("entity") or None,
                               name=wandb_cfg.get("name") or None, config=redact(run_config or {}),
                               dir=None if self._mirror.remote else os.fspath(self.logdir),
                               resume="allow")
    if console:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    """Scalars named like `train/loss` or `eval/loss`."""
    if not self.is_main:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    if self._wandb is not None:
      self._wandb.log(scalars, step=step)
    if self._mirror.remote and time.monotonic() - self._synced_at >= self._sync_every_s:
      self.sync()

  def sync(self) -> None:
    """Copy what changed to a logdir that is not local (nothing to do for a local one)."""
    if self._mirror is None or not self._mirror.remote:
      return
    self._tb.flush()
    self._mirror.sync()
    self._synced_at = time.monotonic()

  def progress(self, step: int, **postfix) -> None:
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._wandb is not None:
      self._wandb.finish()
    if self._mirror is not None:
      self._mirror.close()


def _lines_up_to(path: epath.Path, step: int) -> str:
  """The lines of a metrics.jsonl whose step is at most `step` (a torn last line is dropped)."""
  keep = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if row.get("step", 0) <= step:
      keep.append(line + "\n")
  return "".join(keep)
