"""Checkpoints of our models: orbax, one directory per step, items `params` and `meta`.

Every checkpoint this project writes (training runs included) holds at least:
- `params`: the model parameters (an unboxed pytree), restorable onto any mesh;
- `meta`: JSON with `model` (ModelConfig.to_dict()) and optionally `tokenizer` (a directory).
Training adds its own items (optimizer state, data position) beside them.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from proxykd.models.config import ModelConfig
from proxykd.models.transformer import abstract_params
from proxykd.train.state import with_shardings

PARAMS, META = "params", "meta"


def save_checkpoint(directory: epath.PathLike, step: int, params, meta: dict[str, Any]) -> epath.Path:
  """Write params + meta as step `step` under `directory` (synchronously)."""
  directory = epath.Path(directory)
  with ocp.CheckpointManager(directory) as mngr:
    mngr.save(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(params),
                                               META: ocp.args.JsonSave(meta)}))
    mngr.wait_until_finished()
  return directory / str(step)


def resolve(path: epath.PathLike) -> tuple[epath.Path, int]:
  """A checkpoint root (latest step) or one step's directory -> (root, step)."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  if re.fullmatch(r"\d+", path.name) and (path / META).exists():
    return path.parent, int(path.name)
  steps = sorted(int(p.name) for p in path.iterdir() if re.fullmatch(r"\d+", p.name))
  if not steps:
    raise FileNotFoundError(f"{path}: no checkpoint steps (expected numbered step directories)")
  return path, steps[-1]


def restore_meta(path: epath.PathLike) -> dict[str, Any]:
  root, step = resolve(path)
  with ocp.CheckpointManager(root) as mngr:
    return mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]


def restore_params(path: epath.PathLike, shardings=None):
  """-> (params, meta). `shardings`: pytree of Shardings for the current mesh (None: one device)."""
  root, step = resolve(path)
  meta = restore_meta(path)
  cfg = ModelConfig.from_dict(meta["model"])
  abstract = abstract_params(cfg)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  target = with_shardings(abstract, shardings)
  with ocp.CheckpointManager(root) as mngr:
    restored = mngr.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))
  return restored[PARAMS], meta


def restore_for_inference(path: epath.PathLike, shardings=None):
  """-> (params with any LoRA adapters merged, ModelConfig without LoRA, meta)."""
  params, meta = restore_params(path, shardings)
  cfg = ModelConfig.from_dict(meta["model"])
  if cfg.lora_rank:
    from proxykd.train import lora  # pylint: disable=g-import-not-at-top
    params, cfg = lora.merge(params, cfg)
  return params, cfg, meta
