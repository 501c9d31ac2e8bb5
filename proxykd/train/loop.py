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
from jax.sharding import Mesh

from proxykd.data.batches import BatchIterator, to_global
from proxykd.runner import UserError
from proxykd.train.manager import TrainCheckpoints
from proxykd.train.metrics import MetricWriter
from proxykd.train.state import TrainState


class NonFiniteLossError(UserError):
  """The loss became NaN or inf."""


@dataclasses.dataclass
class LoopConfig:
  total_steps: int
  log_every: int = 10
  eval_every: int = 0  # 0: only at the end (if there is held-out data)
  save_every: int = 200


def evaluate(eval_fn, params, batches: list[dict], mesh: Mesh) -> float:
  """Mean loss over all loss tokens of `batches` (eval_fn returns (loss sum, token count))."""
  total, count = 0.0, 0.0
  for batch in batches:
    loss_sum, n = jax.device_get(eval_fn(params, to_global(batch, mesh)))
    total, count = total + float(loss_sum), count + float(n)
  return total / max(count, 1.0)


def train(state: TrainState, step_fn: Callable, data: BatchIterator, mesh: Mesh,
          ckpt: TrainCheckpoints, meta: dict[str, Any], writer: MetricWriter, loop: LoopConfig,
          eval_fn: Callable | None = None, eval_batches: list[dict] | None = None) -> TrainState:
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
      writer.write(s, {f"train/{k}": v for k, v in m.items()})
    m = fetched[-1]
    writer.write(step, {"train/tokens_per_s": tokens_per_s})
    writer.progress(step, loss=float(m["loss"]), tok_s=tokens_per_s)
    pending.clear()

  has_eval = eval_fn is not None and bool(eval_batches)
  for step in range(start, loop.total_steps):
    state, metrics = step_fn(state, to_global(data.next_local(), mesh))
    done = step + 1
    pending.append((done, metrics))
    last = done == loop.total_steps
    save = done % loop.save_every == 0 or last
    run_eval = has_eval and ((loop.eval_every and done % loop.eval_every == 0) or last)
    if save or run_eval or done % loop.log_every == 0:
      flush(done)
    if run_eval:
      eval_loss = evaluate(eval_fn, state.params, eval_batches, mesh)
      writer.write(done, {"eval/loss": eval_loss})
      logging.info("step %d: held-out loss %.5f", done, eval_loss)
      clock[0] = time.perf_counter()  # Evaluation time is not training throughput.
    if save:
      ckpt.save(done, state, meta, data.state())
      last_saved = done
  flush(loop.total_steps)
  ckpt.close()
  return state
