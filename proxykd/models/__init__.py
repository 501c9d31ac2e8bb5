"""The decoder, its configs, HF interop and tokenizers."""
from proxykd.models.config import ModelConfig, UnsupportedModelError, from_hf_config, preset, to_hf_config
from proxykd.models.transformer import (Transformer, abstract_params, init_cache, init_params,
                                        lm_head_kernel, logical_axes)
from proxykd.models.hf_io import export_hf, load_hf, read_hf_config
