"""Export one of our checkpoints as a Hugging Face model directory.

  python main.py --config=configs/export.py --workdir=DIR \
      --config.checkpoint=DIR/proxy_sft/checkpoints --config.output=DIR/hf_model
"""
import ml_collections

from configs import common


def get_config(arg=None):
  common.parse_arg(arg)  # No variants: any text after the colon is refused.
  config = ml_collections.ConfigDict()
  config.stage = "export"
  config.checkpoint = ""  # A checkpoint root (its latest step is used) or one step's directory.
  config.output = ""  # The HF directory to write; default <workdir>/export/hf.
  config.tokenizer = ""  # Tokenizer dir to copy in; default: the one recorded in the checkpoint.
  config.dtype = "bfloat16"  # Storage dtype of the exported weights: float32 | bfloat16 | float16.
  config.max_shard_gb = 4.0
  # The checkpoint is restored sharded over this mesh (a 70B model fits no single device); the
  # export gathers one tensor at a time.
  config.mesh = common.mesh_config("fsdp")
  return config
