"""The training run's checkpoints: an orbax CheckpointManager with async saves, keep-last-K and
automatic resume, restoring onto whatever mesh the run has now.

Items of every step (proxykd/models/checkpoint.py reads the first two, so `restore_params` and the
export stage work on training checkpoints):
- `params`: the model parameters; `meta`: JSON with `model` (ModelConfig.to_dict()) and more;
- `train`: optimizer state, step and RNG; `data`: JSON, the data iterator's position.

The directory may be any etils.epath path: on gs://, orbax makes its directories and JSON items
through epath (gcsfs) and writes the arrays with tensorstore's own gcs driver, marking finished
steps with commit_success.txt instead of renaming them (tests/test_remote_workdir.py).
"""
from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from proxykd.models.checkpoint import META, PARAMS
from proxykd.train.state import TrainState

TRAIN, DATA = "train", "data"


def _train_item(state: TrainState) -> dict:
  return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}


class TrainCheckpoints:

  def __init__(self, directory: epath.PathLike, keep: int = 3, async_save: bool = True):
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.mngr = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def save(self, step: int, state: TrainState, meta: dict[str, Any], data: dict[str, Any]) -> None:
    """Start saving (returns once the arrays are copied off the devices)."""
    self.mngr.save(step, force=True, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(state.params),
        TRAIN: ocp.args.StandardSave(_train_item(state)),
        META: ocp.args.JsonSave(meta),
        DATA: ocp.args.JsonSave(data),
    }))

  def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict, dict]:
    """Restore step `step` onto `target`'s shardings (ShapeDtypeStructs with `.sharding`): the
    arrays are re-sharded to the current mesh whatever mesh saved them. -> (state, meta, data)."""
    out = self.mngr.restore(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardRestore(target.params),
        TRAIN: ocp.args.StandardRestore(_train_item(target)),
        META: ocp.args.JsonRestore(),
        DATA: ocp.args.JsonRestore(),
    }))
    train = out[TRAIN]
    state = TrainState(step=train["step"], params=out[PARAMS], opt_state=train["opt_state"],
                       rng=train["rng"])
    return state, out[META], out[DATA]

  def wait(self) -> None:
    self.mngr.wait_until_finished()

  def close(self) -> None:
    self.mngr.wait_until_finished()
    self.mngr.close()
