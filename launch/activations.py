"""An upper estimate of the per-device memory a program needs beyond its inputs: activations,
gradients, gathered weights, loss chunks, the DPO sampler's KV cache.

Exact per-device bytes of the inputs (weights, optimizer state, frozen models, batch) come from the
shardings (launch/programs.py); what XLA allocates while the program runs is estimated here from
the model's shapes, term by term, each as large as the code can make it:

- residuals: what the layer scan keeps for the backward pass, per layer and for every layer, by
  `model.remat` (proxykd/models/transformer.py REMAT_POLICIES): `full` the layer's input, the
  others the named projections too; `none` everything, the attention's scores included;
- one layer's forward and backward working set (recomputed activations and their gradients, x2);
- attention: XLA's float32 scores and probabilities and their gradients (4 x rows x heads x T x T
  x 4 bytes) unless the hardware runs a fused kernel (`model.attention=auto`: splash on TPU, which
  keeps per-row statistics only; cuDNN on GPU, which also takes the segment mask as a T x T bias);
- the loss: the final hidden states and their gradient, and `loss_chunk` positions of vocabulary
  logits in float32 (x3: logits, probabilities, their gradient); online distillation adds the
  proxy's hidden states and its chunk of logits and posterior (x2);
- FSDP: one layer's weights gathered whole (x2: XLA prefetches the next layer's), the embedding
  table and the lm_head gathered whole, and for a fully trained model the layer's and the head's
  gradients before their reduce-scatter;
- gradients and the optimizer's update of the trained parameters: 2 x their bytes.
Activations are split like proxykd/train/sharding.py's rules: rows over data x fsdp, heads and the
MLP over tensor, the embedding dimension whole. This is an estimate, not XLA's buffer assignment
(which the TPU or GPU compiler does); tests/test_launch_memory.py checks it is above XLA:CPU's own
figure for the same programs at small sizes, and launch/memory.py adds a 10% margin on top.
"""
from __future__ import annotations

from proxykd.models.config import ModelConfig

FLASH = ("splash", "cudnn", "pallas_gpu")


def _bytes(dtype: str) -> int:
  return 2 if dtype in ("bfloat16", "float16") else 4


def layer_params(cfg: ModelConfig) -> int:
  """Parameters of one decoder layer (LoRA adapters left out: they are tiny)."""
  e, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  return e * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * e * f + 2 * e


def _sizes(cfg: ModelConfig, rows: int, seq: int, tensor: int) -> dict[str, int]:
  """Elements per device of one layer's activations, by name."""
  bt, d = rows * seq, cfg.head_dim
  return {
      "hidden": bt * cfg.hidden_size,  # [b, T, E]: x, the norms, attention and MLP outputs
      "qkv": bt * (cfg.num_heads + 2 * cfg.num_kv_heads) * d // tensor,
      "context": bt * cfg.num_heads * d // tensor,
      "mlp": bt * cfg.intermediate_size // tensor,  # one of gate, up, silu(gate) * up
      "scores": rows * cfg.num_heads // tensor * seq * seq,
      "lora": bt * cfg.lora_rank * len(cfg.lora_targets) if cfg.lora_rank else 0,
  }


def attention_bytes(cfg: ModelConfig, rows: int, seq: int, tensor: int, attention: str) -> int:
  """Attention's own intermediates for one layer, forward and backward."""
  n = _sizes(cfg, rows, seq, tensor)
  if attention in FLASH:
    stats = 2 * rows * cfg.num_heads // tensor * seq * 4  # row max and sum, float32
    bias = rows * seq * seq * 2 if attention == "cudnn" else 0  # the segment mask as a bias
    return 2 * stats + bias
  return 4 * n["scores"] * 4  # scores, probabilities and their gradients, float32


def saved_per_layer(cfg: ModelConfig, rows: int, seq: int, tensor: int, attention: str) -> int:
  """Bytes the layer scan keeps per layer for the backward pass under cfg.remat."""
  n, s = _sizes(cfg, rows, seq, tensor), _bytes(cfg.dtype)
  x = n["hidden"] * s
  qkv, ctx, out, mlp = n["qkv"] * s, n["context"] * s, n["hidden"] * s, n["mlp"] * s
  projections = qkv + out + 2 * mlp + n["hidden"] * s + n["lora"] * s  # q k v, o, gate up, down
  policy = cfg.remat
  if policy in ("full", "minimal_offload", "save_qkv_proj_offload"):
    return x
  if policy == "save_qkv_proj":
    return x + qkv
  if policy == "save_out_proj":
    return x + out
  if policy in ("minimal", "dots"):
    return x + projections
  if policy == "minimal_with_context":
    return x + projections + ctx
  # none: everything a layer computes, float32 norm internals and attention intermediates too.
  return (x + projections + ctx + 3 * n["hidden"] * s + 2 * n["hidden"] * 4 + mlp
          + attention_bytes(cfg, rows, seq, tensor, attention) // 2)


def layer_working_set(cfg: ModelConfig, rows: int, seq: int, tensor: int, attention: str,
                      backward: bool) -> int:
  """One layer's activations while it runs (forward), or recomputed with their gradients."""
  n, s = _sizes(cfg, rows, seq, tensor), _bytes(cfg.dtype)
  acts = (4 * n["hidden"] * s + 2 * n["hidden"] * 4 + n["qkv"] * s + n["context"] * s
          + 3 * n["mlp"] * s + n["lora"] * s)
  attn = attention_bytes(cfg, rows, seq, tensor, attention)
  return 2 * acts + attn if backward else acts + attn // 2


def gathered_bytes(cfg: ModelConfig, tensor: int, trained: bool) -> int:
  """FSDP: one layer's weights gathered whole (x2 prefetch), the embedding and lm_head whole,
  and for a trained model those weights' gradients before the reduce-scatter."""
  p = _bytes(cfg.param_dtype)
  layer = layer_params(cfg) * p // tensor
  tables = 2 * cfg.vocab_size * cfg.hidden_size * p // tensor
  if trained:
    return 3 * layer + 2 * tables
  return 2 * layer + tables


def loss_bytes(cfg: ModelConfig, rows: int, seq: int, tensor: int, chunk: int) -> int:
  """The chunked vocabulary loss: final hidden states and their gradient, one chunk of logits."""
  s = _bytes(cfg.dtype)
  hidden = 2 * rows * seq * cfg.hidden_size * s
  logits = 3 * rows * min(chunk, seq) * cfg.vocab_size // tensor * 4
  return hidden + logits


def train_transient(cfg: ModelConfig, rows: int, seq: int, tensor: int, chunk: int,
                    attention: str, trained_bytes: int, proxy: ModelConfig | None = None) -> dict:
  """Per-device bytes a training step allocates beyond its inputs, by term. `rows`: the
  micro-batch's rows on one device; `trained_bytes`: the trained parameters' bytes on one device;
  `proxy`: a frozen model run inside the step (online distillation)."""
  out = {
      "residuals": cfg.num_layers * saved_per_layer(cfg, rows, seq, tensor, attention),
      "layer": layer_working_set(cfg, rows, seq, tensor, attention, backward=True),
      "loss": loss_bytes(cfg, rows, seq, tensor, chunk),
      # A LoRA base is gathered like any weights but has no gradient.
      "gathered": gathered_bytes(cfg, tensor, trained=not cfg.lora_rank),
      "grads": 2 * trained_bytes,
  }
  if proxy is not None:
    s = _bytes(proxy.dtype)
    out["proxy"] = (layer_working_set(proxy, rows, seq, tensor, attention, backward=False)
                    + gathered_bytes(proxy, tensor, trained=False)
                    + rows * seq * proxy.hidden_size * s
                    + 2 * rows * min(chunk, seq) * proxy.vocab_size // tensor * 4)
  return out


def forward_transient(cfg: ModelConfig, rows: int, seq: int, tensor: int, chunk: int,
                      attention: str) -> dict:
  """Per-device bytes a scoring pass allocates beyond its inputs (no residuals: no backward)."""
  s = _bytes(cfg.dtype)
  return {
      "layer": layer_working_set(cfg, rows, seq, tensor, attention, backward=False),
      "loss": rows * seq * cfg.hidden_size * s + 3 * rows * min(chunk, seq) * cfg.vocab_size // tensor * 4,
      "gathered": gathered_bytes(cfg, tensor, trained=False),
  }


def kv_cache_bytes(cfg: ModelConfig, rows: int, length: int, tensor: int) -> int:
  """The sampler's KV cache on one device: keys and values of every layer, rows over the batch
  axes, kv heads over tensor (proxykd/models/transformer.py init_cache)."""
  return (2 * cfg.num_layers * rows * length * max(cfg.num_kv_heads // tensor, 1) * cfg.head_dim
          * _bytes(cfg.dtype))
