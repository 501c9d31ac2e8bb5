"""Shared config pieces: argument parsing for `configs/X.py:arg`, model and mesh presets.

Follows big_vision's convention: `get_config(arg)` receives the text after the colon, parsed by
`parse_arg` into named flags, e.g. `configs/proxy_sft.py:runlocal,model=small`.
"""
from __future__ import annotations

import ml_collections

from proxykd.models.config import PRESETS, ModelConfig


def parse_arg(arg: str | None, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
  """Parse "a=1,b,c=x" against defaults `spec` (a bare name sets a bool True).

  Unknown names are refused unless `lazy`, so a typo in the variant never passes silently.
  """
  result = ml_collections.ConfigDict(dict(spec))
  for part in filter(None, (arg or "").split(",")):
    name, _, value = part.partition("=")
    if name not in spec and not lazy:
      raise KeyError(f"config argument {name!r} is unknown; known: {sorted(spec)}")
    default = spec.get(name)
    if not value:
      result[name] = True
    elif isinstance(default, bool):
      result[name] = value.lower() in ("1", "true", "yes", "y")
    elif isinstance(default, int):
      result[name] = int(value)
    elif isinstance(default, float):
      result[name] = float(value)
    else:
      result[name] = value
  return result


def model_config(name: str = "tiny", **overrides) -> ml_collections.ConfigDict:
  """A `config.model` block: every ModelConfig field, from a preset, overridable from the CLI."""
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return ml_collections.ConfigDict(
      {"preset": name, **ModelConfig(**{**PRESETS[name], **overrides}).to_flat_dict()})


# Device meshes: sizes of (data, fsdp, tensor); -1 fills the remaining devices.
MESHES = {
    "single": {"data": 1, "fsdp": 1, "tensor": 1},
    "data": {"data": -1, "fsdp": 1, "tensor": 1},
    "fsdp": {"data": 1, "fsdp": -1, "tensor": 1},
    "fsdp_tp2": {"data": 1, "fsdp": -1, "tensor": 2},
    "fsdp_tp8": {"data": 1, "fsdp": -1, "tensor": 8},
}


def mesh_config(name: str = "fsdp") -> ml_collections.ConfigDict:
  if name not in MESHES:
    raise KeyError(f"unknown mesh preset {name!r}; known: {sorted(MESHES)}")
  return ml_collections.ConfigDict(MESHES[name])
