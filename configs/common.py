"""Shared config pieces: argument parsing for `configs/X.py:arg`, model and mesh presets.

Follows big_vision's convention: `get_config(arg)` receives the text after the colon, parsed by
`parse_arg` into named flags, e.g. `configs/proxy_sft.py:runlocal,model=small`.
"""
from __future__ import annotations

from typing import Any, Callable

import ml_collections

from proxykd.models.config import PRESETS, ModelConfig

_TRUE = ("1", "true", "yes", "y", "on")
_FALSE = ("0", "false", "no", "n", "off")

# While `variant_flags` runs a get_config, the specs that parse_arg saw; None otherwise.
_recorded_specs: list[dict[str, Any]] | None = None


class VariantError(ValueError):
  """A bad variant after the colon of `configs/X.py:variant` (unknown flag or bad value)."""


def parse_arg(arg: str | None, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
  """Parse "a=1,b,c=x" against defaults `spec` (a bare name sets a bool True).

  Unknown names are refused (VariantError) unless `lazy`, so a typo in the variant never passes
  silently; so are values that do not parse as their default's type.
  """
  if _recorded_specs is not None:
    _recorded_specs.append(dict(spec))
  result = ml_collections.ConfigDict(dict(spec))
  for part in filter(None, (arg or "").split(",")):
    name, _, value = part.partition("=")
    if name not in spec and not lazy:
      known = f"known: {sorted(spec)}" if spec else "this config takes no variant flags"
      raise VariantError(f"unknown variant flag {name!r}; {known}")
    default = spec.get(name)
    if not value:
      result[name] = True
    elif isinstance(default, bool):
      if value.lower() not in _TRUE + _FALSE:
        raise VariantError(f"variant flag {part!r}: expected a boolean (true/false)")
      result[name] = value.lower() in _TRUE
    elif isinstance(default, (int, float)):
      try:
        result[name] = type(default)(value)
      except ValueError:
        raise VariantError(f"variant flag {part!r}: expected {type(default).__name__} "
                           f"like the default {default!r}") from None
    else:
      result[name] = value
  return result


def variant_flags(get_config: Callable[..., Any]) -> dict[str, Any]:
  """The variant flags a config file accepts, with their defaults: {} if it takes none.

  Runs `get_config()` once and records what it passed to `parse_arg`, so the flags are read from
  the one place that defines them (used by `python main.py --help`).
  """
  global _recorded_specs
  _recorded_specs, previous = [], _recorded_specs
  try:
    get_config()
    specs = _recorded_specs
  finally:
    _recorded_specs = previous
  return dict(specs[0]) if specs else {}  # the config's own call (it may build other configs)


def model_config(name: str = "tiny", **overrides) -> ml_collections.ConfigDict:
  """A `config.model` block: every ModelConfig field, from a preset, overridable from the CLI."""
  if name not in PRESETS:
    raise VariantError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
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
    raise VariantError(f"unknown mesh preset {name!r}; known: {sorted(MESHES)}")
  return ml_collections.ConfigDict(MESHES[name])
