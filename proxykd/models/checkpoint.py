"""Checkpoints of our models: orbax, one directory per step, items `params` and `meta`.

Every checkpoint this project writes (training runs included) holds at least:
- `params`: the model parameters (an unboxed pytree), restorable onto any mesh. For a LoRA model
  these are the adapters only, and `meta["base"]` says where the base weights come from;
- `meta`: JSON with `model` (ModelConfig.to_dict()), optionally `tokenizer` (a directory) and
  `base` (a base reference, below).
Training adds its own items (optimizer state, data position) beside them.

A base reference names where a model's (base) weights come from without copying them:
`{"hf": DIR}` (a Hugging Face directory), `{"checkpoint": PATH}` (one of ours, LoRA merged) or
`{"random": SEED}` (our random init, for tests and from-scratch runs). `load_params` turns one into
parameters on the requested shardings.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath

from proxykd.models import lora
from proxykd.models.config import ModelConfig
from proxykd.models.transformer import abstract_params, init_params

PARAMS, META = "params", "meta"
# ModelConfig fields a run may change on weights it loads (not their shapes).
RUN_FIELDS = ("dtype", "param_dtype", "remat", "attention", "lora_rank", "lora_alpha", "lora_targets")


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs carrying the target shardings (for compiling and for restoring)."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _single_device(tree):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda _: device, tree)


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
  steps = sorted(int(p.name) for p in path.iterdir()
                 if re.fullmatch(r"\d+", p.name) and (p / META).exists())
  if not steps:
    raise FileNotFoundError(f"{path}: no checkpoint steps (expected numbered step directories)")
  return path, steps[-1]


def is_checkpoint(path: epath.PathLike) -> bool:
  try:
    resolve(path)
    return True
  except FileNotFoundError:
    return False


def weights_identity(ref: dict[str, Any]) -> dict[str, Any]:
  """What identifies the weights a reference names, for fingerprints of artefacts made with them
  (a proxy cache): the reference, and the resolved step of a checkpoint or the sizes and times of
  an HF directory's weight files."""
  if "checkpoint" in ref:
    root, step = resolve(ref["checkpoint"])
    return {**ref, "checkpoint": str(root), "step": step}
  if "hf" in ref:
    files = sorted(epath.Path(ref["hf"]).glob("*.safetensors"))
    return {**ref, "files": [(f.name, f.stat().length, int(f.stat().mtime)) for f in files]}
  return dict(ref)


def restore_meta(path: epath.PathLike) -> dict[str, Any]:
  root, step = resolve(path)
  with ocp.CheckpointManager(root) as mngr:
    return mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]


def _restore_item(path, abstract, shardings):
  root, step = resolve(path)
  target = with_shardings(abstract, shardings)
  with ocp.CheckpointManager(root) as mngr:
    return mngr.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))[
        PARAMS]


def load_params(ref: dict[str, Any], cfg: ModelConfig,
                shardings_for: Callable[[ModelConfig], Any] | None = None):
  """The full parameters of `cfg` (adapters included when cfg has LoRA) from a base reference.

  Weights loaded from `hf` or `checkpoint` get fresh adapters (B = 0: the model is unchanged);
  `random` is our init with that seed. `shardings_for(cfg)`: the Shardings of a config's
  parameters (e.g. proxykd/train/sharding.py `param_shardings` on the run's mesh; None: the first
  device).
  """
  shardings = shardings_for(cfg) if shardings_for else _single_device(abstract_params(cfg))
  if "random" in ref:  # The seed's first split half (the second seeds the train state's RNG).
    return init_params(cfg, jax.random.split(jax.random.PRNGKey(int(ref["random"])))[0], shardings)
  if "hf" in ref:
    from proxykd.models import hf_io  # pylint: disable=g-import-not-at-top
    params, _ = hf_io.load_hf(ref["hf"], shardings, **{f: getattr(cfg, f) for f in RUN_FIELDS})
    return params
  if "checkpoint" in ref:
    params, merged_cfg, _ = restore_for_inference(ref["checkpoint"], shardings_for)
    if merged_cfg.replace(**{f: getattr(cfg, f) for f in RUN_FIELDS}) != cfg:
      raise ValueError(f"checkpoint {ref['checkpoint']} holds a model of another shape than the "
                       "one configured")
    if not cfg.lora_rank:
      return params
    return lora.combine(lora.fresh_adapters(cfg, lora.split(shardings, cfg)[0]), params)
  raise ValueError(f"unknown base reference {ref!r}: expected one of hf, checkpoint, random")


def restore_params(path: epath.PathLike, shardings_for: Callable[[ModelConfig], Any] | None = None):
  """-> (full params, meta). `shardings_for(cfg)`: the Shardings of cfg's parameters (None: the
  first device). A LoRA checkpoint's base is loaded from its `meta["base"]` reference."""
  meta = restore_meta(path)
  cfg = ModelConfig.from_dict(meta["model"])
  abstract = abstract_params(cfg)
  shardings = shardings_for(cfg) if shardings_for else _single_device(abstract)
  if not (cfg.lora_rank and meta.get("base")):
    return _restore_item(path, abstract, shardings), meta
  adapters_abs, _ = lora.split(abstract, cfg)
  adapters_sh, _ = lora.split(shardings, cfg)
  base = lora.split(load_params(meta["base"], cfg, shardings_for), cfg)[1]
  return lora.combine(_restore_item(path, adapters_abs, adapters_sh), base), meta


def restore_for_inference(path: epath.PathLike,
                          shardings_for: Callable[[ModelConfig], Any] | None = None):
  """-> (params with any LoRA adapters merged, ModelConfig without LoRA, meta)."""
  params, meta = restore_params(path, shardings_for)
  cfg = ModelConfig.from_dict(meta["model"])
  if cfg.lora_rank:
    params, cfg = lora.merge(params, cfg)
  return params, cfg, meta
