"""The training loop: run a compiled step over batches, log, evaluate, checkpoint, stop on NaN.

Metrics stay on the devices until a log, eval or save point; then they are fetched at once and
checked: a non-finite loss stops the run before any later checkpoint is written, so the last
checkpoint on disk is the last good one.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
from absl import logging

from proxykd.data.batches import BatchIterator, HostSlice
from proxykd.errors import UserError
from proxykd.train.manager import TrainCheckpoints
from proxykd.train.metrics import MetricWriter
from proxykd.train.state import TrainState


class NonFiniteLossError(UserError):
  """The loss became NaN or inf."""


@dataclasses.dataclass
class LoopConfig:
  """Every `*_every` of 0 means: only at the end of the run."""
  total_steps: int
  log_every: int = 10
  eval_every: int = 0  # (only if there is held-out data)
  save_every: int = 200

  def due(self, every: int, step: int) -> bool:
    return step == self.total_steps or (every > 0 and step % every == 0)


def evaluate(eval_fn, params, frozen: dict, batches: list[dict], host: HostSlice) -> dict[str, float]:
  """{"loss": the loss over all of `batches` (summed, then divided by the summed normaliser), and
  each metric likewise}: eval_fn returns (loss sum, normaliser, {name: (num, den)})."""
  total, norm, sums = 0.0, 0.0, {}
  for batch in batches:
    loss_sum, n, metrics = jax.device_get(eval_fn(params, host.assemble(batch), frozen))
    total, norm = total + float(loss_sum), norm + float(n)
    for k, (num, den) in metrics.items():
      a, b = sums.get(k, (0.0, 0.0))
      sums[k] = (a + float(num), b + float(den))
  return {"loss": total / max(norm, 1.0), **{k: a / max(b, 1e-9) for k, (a, b) in sums.items()}}


def train(state: TrainState, step_fn: Callable, data: BatchIterator, host: HostSlice,
          frozen: dict, ckpt: TrainCheckpoints, meta: dict[str, Any], writer: MetricWriter,
          loop: LoopConfig, eval_fn: Callable | None = None,
          eval_batches: list[dict] | None = None) -> TrainState:
  """Run `step_fn(state, batch, frozen)` up to loop.total_steps, resuming at state.step."""
  start = int(jax.device_get(state.step))
  pending: list[tuple[int, dict]] = []
  last_saved = ckpt.latest_step()
  clock = [time.perf_counter()]

  def flush(step: int) -> None:
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    now = time.perf_counter()
    tokens_per_s = sum(float(m["batch_tokens"]) for m in fetched) / max(now - clock[0], 1e-9)
    clock[0] = now
    for (s, _), m in zip(pending, fetched):
      if not math.isfinite(float(m["loss"])):
        ckpt.close()
        where = (f"the last good checkpoint is step {last_saved} in {ckpt.directory}"
                 if last_saved is not None else "no checkpoint was saved")
        raise NonFiniteLossError(
            f"training loss is {float(m['loss'])} at step {s} (grad norm {float(m['grad_norm'])});"
            f" stopping: {where}. Lower config.optim.lr, check the data, or set "
            "config.optim.clip_norm")
      writer.write(s, {k if "/" in k else f"train/{k}": v for k, v in m.items()})
    m = fetched[-1]
    writer.write(step, {"train/tokens_per_s": tokens_per_s})
    writer.progress(step, loss=float(m["loss"]), tok_s=tokens_per_s)
    pending.clear()

  has_eval = eval_fn is not None and bool(eval_batches)
  for step in range(start, loop.total_steps):
    state, metrics = step_fn(state, host.assemble(data.next_local()), frozen)
    done = step + 1
    pending.append((done, metrics))
    save = loop.due(loop.save_every, done)
    run_eval = has_eval and loop.due(loop.eval_every, done)
    if save or run_eval or loop.due(loop.log_every, done):
      flush(done)
    if run_eval:
      result = evaluate(eval_fn, state.params, frozen, eval_batches, host)
      writer.write(done, {f"eval/{k}": v for k, v in result.items()})
      logging.info("step %d: held-out loss %.5f", done, result["loss"])
      clock[0] = time.perf_counter()  # Evaluation time is not training throughput.
    if save:
      ckpt.save(done, state, meta, data.state())
      last_saved = done
  flush(loop.total_steps)
  ckpt.close()
  return state
