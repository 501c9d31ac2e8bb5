"""Stage `export`: one of our checkpoints -> a Hugging Face model directory.

The checkpoint is restored sharded over `config.mesh` (LoRA adapters merged on the devices), so a
model larger than one device exports; `export_hf` gathers and writes one tensor at a time.
"""
from __future__ import annotations

from absl import logging
from etils import epath

from proxykd import runner
from proxykd.models import hf_io
from proxykd.models import checkpoint
from proxykd.train import sharding as shd
from proxykd.train import trainer


def run(config, workdir):
  if not config.checkpoint:
    raise runner.UserError("export: set --config.checkpoint=PATH (a checkpoint directory)")
  if config.dtype not in ("float32", "bfloat16", "float16"):
    raise runner.UserError(f"export: config.dtype={config.dtype!r} must be float32, bfloat16 or float16")
  try:
    mesh = shd.mesh_from_config(config.mesh)
  except (KeyError, ValueError) as e:
    raise runner.UserError(str(e)) from None
  try:
    params, cfg, meta = checkpoint.restore_for_inference(config.checkpoint, trainer.shardings_for(mesh))
  except FileNotFoundError as e:
    raise runner.UserError(f"export: config.checkpoint: {e}") from None
  output = epath.Path(config.output or runner.stage_dir(workdir, "export") / "hf")
  tokenizer = config.tokenizer or meta.get("tokenizer") or None
  hf_io.export_hf(params, cfg, output, tokenizer_dir=tokenizer, dtype=config.dtype,
                  max_shard_bytes=int(config.max_shard_gb * (1 << 30)))
  logging.info("export: wrote %s (%s parameters, %s)", output, f"{cfg.num_params:,}", config.dtype)
  print(f"exported {config.checkpoint} -> {output}")
  return output
