"""The decoder's hyper-parameters, the named presets, and translation to/from HF `config.json`.

One frozen dataclass describes every supported family (Llama-2, Llama-3, Qwen2/2.5, Mistral without
sliding window). HF fields we cannot honour are refused by name instead of silently ignored.
"""
from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# `model.attention`: how attention is computed (proxykd/models/attention.py). `auto` picks the fastest
# one the backend and the inputs support; the others force one (where its backend is absent, xla).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas_gpu", "splash")
# `model.remat`: what each scanned layer keeps for the backward pass (proxykd/models/transformer.py
# `REMAT_POLICIES`): none keeps everything, full only the layer's input, dots every matmul output
# without batch dimensions; the others keep the named activations (`*_offload`: in host memory).
REMAT_POLICIES = ("none", "full", "dots", "minimal", "minimal_with_context", "save_qkv_proj",
                  "save_out_proj", "minimal_offload", "save_qkv_proj_offload")


class UnsupportedModelError(ValueError):
  """An HF config asks for something this decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int = 0  # 0: hidden_size // num_heads
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # None, or a dict in HF's `rope_parameters` style without rope_theta: {"rope_type": "llama3", ...}.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2: biases on q/k/v projections (not on o).
  model_type: str = "llama"  # The HF family written on export.
  dtype: str = "auto"  # Compute dtype; auto = float32 on CPU, bfloat16 on GPU/TPU.
  param_dtype: str = "float32"  # Storage dtype of the parameters.
  remat: str = "none"  # Per-layer rematerialisation policy, one of REMAT_POLICIES.
  attention: str = "auto"  # Attention implementation, one of ATTENTION_IMPLEMENTATIONS.
  initializer_range: float = 0.02
  # LoRA adapters on the named projections (q k v o gate up down); rank 0 means none.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

  def __post_init__(self):
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    if self.head_dim == 0:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    for key in ("dtype", "param_dtype"):
      if getattr(self, key) not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"model.{key}={getattr(self, key)!r}: use auto|float32|bfloat16|float16")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat must be one of {'|'.join(REMAT_POLICIES)}, got {self.remat!r}")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"model.attention must be one of {'|'.join(ATTENTION_IMPLEMENTATIONS)}, "
                       f"got {self.attention!r}")
    bad_targets = sorted(set(self.lora_targets) - set(LORA_TARGETS))
    if bad_targets:
      raise ValueError(f"lora_targets {bad_targets} are not projections; choose from {LORA_TARGETS}")
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise UnsupportedModelError(f"model_type {self.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
    rope_type = self.rope_scaling_dict.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise UnsupportedModelError(f"rope_scaling type {rope_type!r} is not one of {SUPPORTED_ROPE_TYPES}")

  @property
  def rope_scaling_dict(self) -> dict[str, Any]:
    return dict(self.rope_scaling or ())

  @property
  def num_params(self) -> int:
    e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
    attn = e * d * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.qkv_bias:
      attn += d * (self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * e * f + 2 * e
    head = 0 if self.tie_word_embeddings else e * self.vocab_size
    return self.num_layers * per_layer + self.vocab_size * e + head + e

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["rope_scaling"] = self.rope_scaling_dict or None
    d["lora_targets"] = list(self.lora_targets)
    return d

  def to_flat_dict(self) -> dict[str, Any]:
    """Only scalars and flat dicts, for a `config.model` ConfigDict (CLI-overridable)."""
    d = self.to_dict()
    d["rope_scaling"] = d["rope_scaling"] or {}
    d["lora_targets"] = ",".join(self.lora_targets)
    return d

  @classmethod
  def from_config_block(cls, block) -> "ModelConfig":
    """The inverse of `to_flat_dict`, from a `config.model` block (a ConfigDict or dict); its
    `preset` key, naming where the block came from, is ignored."""
    d = dict(block.to_dict() if hasattr(block, "to_dict") else block)
    d.pop("preset", None)
    d["rope_scaling"] = d.get("rope_scaling") or None
    targets = d.get("lora_targets", "")
    d["lora_targets"] = (tuple(filter(None, targets.split(","))) if isinstance(targets, str)
                         else tuple(targets))
    return cls.from_dict(d)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise KeyError(f"unknown model config key(s) {unknown}; known: {sorted(names)}")
    return cls(**d)


# Shapes of the public checkpoints (vocab and dims as in their HF config.json) plus tiny ones.
PRESETS: dict[str, dict[str, Any]] = {
    # For tests and the CPU demo: a few hundred thousand parameters.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                 num_kv_heads=2, max_position_embeddings=1024),
    # ~25M parameters: the benchmark size for the train step on a CPU.
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=6,
                  num_heads=8, num_kv_heads=4, max_position_embeddings=2048),
    "llama2_7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                      num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096),
    "llama2_13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                       num_heads=40, num_kv_heads=40, rms_norm_eps=1e-5, max_position_embeddings=4096),
    "llama2_70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80,
                       num_heads=64, num_kv_heads=8, rms_norm_eps=1e-5, max_position_embeddings=4096),
    "llama3_8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=131072,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Llama-3.1-70B (as llama3_8b is Llama-3.1-8B: 128k context, llama3 rope scaling).
    "llama3_70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                       num_heads=64, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                       max_position_embeddings=131072,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen2_5_7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                       num_heads=28, num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       max_position_embeddings=32768, qkv_bias=True, model_type="qwen2"),
}


def preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return ModelConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------- HF config.json
def from_hf_config(hf: dict[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
  """Translate an HF config dict (transformers v4 or v5 style); refuse what we cannot honour."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UnsupportedModelError(
        f"{source}: model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
  if hf.get("mlp_bias"):
    raise UnsupportedModelError(f"{source}: mlp_bias=true is not supported")
  if model_type == "llama" and hf.get("attention_bias"):
    raise UnsupportedModelError(f"{source}: attention_bias=true is not supported for llama")
  if "quantization_config" in hf:
    raise UnsupportedModelError(f"{source}: quantization_config (quantized checkpoints) is not supported")
  window = hf.get("sliding_window")
  uses_window = window is not None and (model_type == "mistral" or hf.get("use_sliding_window", False))
  if uses_window:
    raise UnsupportedModelError(
        f"{source}: sliding_window={window} is not supported (full causal attention only); "
        "set it to null if the model was trained without it")
  layer_types = hf.get("layer_types")
  if layer_types and any(t != "full_attention" for t in layer_types):
    raise UnsupportedModelError(f"{source}: layer_types other than full_attention are not supported")

  rope = dict(hf.get("rope_parameters") or {})
  rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
  legacy = hf.get("rope_scaling")
  if legacy and not rope:
    rope = dict(legacy)
  if "type" in rope and "rope_type" not in rope:
    rope["rope_type"] = rope.pop("type")
  rope_type = rope.get("rope_type", "default")
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise UnsupportedModelError(
        f"{source}: rope_scaling type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
  rope_scaling = None if rope_type == "default" else rope

  num_heads = hf["num_attention_heads"]
  fields = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
      num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
      rope_scaling=rope_scaling, max_position_embeddings=hf.get("max_position_embeddings", 4096),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=model_type == "qwen2", model_type=model_type,
      initializer_range=hf.get("initializer_range", 0.02),
  )
  fields.update(overrides)
  return ModelConfig(**fields)


_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def to_hf_config(cfg: ModelConfig, torch_dtype: str = "float32", **token_ids) -> dict[str, Any]:
  """The HF config.json for `cfg` (transformers v5 style, `rope_parameters`)."""
  rope = {"rope_type": "default", **cfg.rope_scaling_dict, "rope_theta": cfg.rope_theta}
  hf = {
      "architectures": [_ARCH[cfg.model_type]], "model_type": cfg.model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
      "rope_parameters": rope, "rope_theta": cfg.rope_theta,
      "max_position_embeddings": cfg.max_position_embeddings,
      "tie_word_embeddings": cfg.tie_word_embeddings, "initializer_range": cfg.initializer_range,
      "torch_dtype": torch_dtype, "use_cache": True,
  }
  if cfg.rope_scaling:
    hf["rope_scaling"] = dict(cfg.rope_scaling_dict)
  if cfg.model_type == "llama":
    hf.update(attention_bias=False, mlp_bias=False)
  if cfg.model_type == "qwen2":
    hf.update(use_sliding_window=False, sliding_window=None)
  if cfg.model_type == "mistral":
    hf.update(sliding_window=None)
  hf.update({k: v for k, v in token_ids.items() if v is not None})
  return hf
