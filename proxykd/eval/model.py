"""The model an evaluation reads: one of our checkpoints or a local Hugging Face directory.

`resolve` names it (a base reference, proxykd/models/checkpoint.py) and its config and tokenizer
directory without loading any weight, so the caller can build the device mesh from the config
first; `load` then puts the weights on the mesh's shardings (LoRA adapters merged). A directory
of an unsupported HF family is refused by name (proxykd/models/config.py `from_hf_config`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from etils import epath

from proxykd.models import checkpoint, hf_io
from proxykd.models.config import ModelConfig
from proxykd.errors import UserError


@dataclasses.dataclass
class ModelSpec:
  ref: dict[str, Any]  # {"hf": DIR} or {"checkpoint": PATH}
  cfg: ModelConfig  # without LoRA (merged on load)
  tokenizer_dir: str
  name: str  # a short label: the directory's name, or <run>/<stage> for one of our checkpoints
  identity: str  # what changes when the weights do (path and checkpoint step)


def _label(path: epath.Path) -> str:
  parts = [p for p in os.fspath(path).rstrip("/").split("/") if p]
  skip = {"hf", "checkpoints"}
  kept = [p for p in parts if p not in skip and not p.isdigit()]
  return "/".join(kept[-2:]) if kept else os.fspath(path)


def resolve(path: str, tokenizer: str = "", dtype: str = "", key: str = "config.model") -> ModelSpec:
  """Name the model at `path` (refused with a one-line UserError naming `key` otherwise)."""
  if not path:
    raise UserError(f"set --{key}=PATH: one of our checkpoints (a checkpoints/ directory or one "
                    "step of it) or a Hugging Face model directory")
  p = epath.Path(path)
  if not p.exists():
    raise UserError(f"{key}={path}: no such file or directory")
  overrides = {"dtype": dtype} if dtype else {}
  if (p / "config.json").exists():
    try:
      cfg = hf_io.read_hf_config(p, **overrides)
    except (ValueError, KeyError) as e:
      raise UserError(f"{key}={path}: {e}") from None
    return ModelSpec({"hf": str(p)}, cfg, tokenizer or str(p), _label(p), f"hf:{p}")
  if checkpoint.is_checkpoint(p):
    root, step = checkpoint.resolve(p)
    meta = checkpoint.restore_meta(p)
    cfg = ModelConfig.from_dict(meta["model"]).replace(lora_rank=0, **overrides)
    tok = tokenizer or meta.get("tokenizer") or ""
    if not tok:
      raise UserError(f"{key}={path}: the checkpoint records no tokenizer; set --config.tokenizer=DIR")
    return ModelSpec({"checkpoint": f"{root}/{step}"}, cfg, tok, _label(root), f"checkpoint:{root}/{step}")
  raise UserError(f"{key}={path}: neither a Hugging Face model directory (no config.json) nor a "
                  "checkpoint of ours (no numbered step with `meta`)")


def load(spec: ModelSpec, shardings_for: Callable[[ModelConfig], Any] | None = None):
  """The model's parameters on `shardings_for(spec.cfg)` (None: the first device), LoRA merged."""
  if "hf" in spec.ref:
    return checkpoint.load_params(spec.ref, spec.cfg, shardings_for)
  params, cfg, _ = checkpoint.restore_for_inference(spec.ref["checkpoint"], shardings_for)
  if cfg.replace(dtype=spec.cfg.dtype) != spec.cfg:
    raise UserError(f"{spec.ref['checkpoint']}: the restored model differs from its recorded config")
  return params
