"""The decoder-only transformer of the Llama family (Llama-2/3, Qwen2/2.5, Mistral) in Flax Linen.

Layout choices:
- Layers are stacked with `nn.scan` (leading logical axis `layers`): one compiled layer body, fast
  compiles for 80-layer models, and one place for rematerialisation: `model.remat` names a policy
  of `REMAT_POLICIES` over the activations each layer tags with `checkpoint_name` (`ACTIVATIONS`).
- Every parameter carries logical axis names; proxykd/train/sharding.py maps them to the mesh.
- Attention takes segment ids: tokens attend only within their own segment (packed documents), and
  causally by index. The same mask serves the KV cache used for sampling: pass `cache` and the new
  keys/values are written at `cache["index"]`, queries attend to every cached slot of their segment.
  The cache travels through the layer scan as part of its carry and each layer writes only its new
  slots in place (never a copy of the whole cache per token). `Transformer(unrolled=True)` runs
  the layers as a Python loop instead, each with its own cache array (what sampling uses on CPU).
- How attention is computed (XLA, cuDNN, Pallas kernels) is `model.attention`:
  proxykd/models/attention.py.
- The forward can stop before the lm_head (`return_hidden=True`): chunked vocabulary losses apply
  the head themselves (see `lm_head_kernel`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from proxykd.models import attention
from proxykd.models.attention import attention_mask, causal_blocks as _causal_blocks  # noqa: F401  pylint: disable=unused-import
from proxykd.models.config import ModelConfig

Array = jax.Array
_HIDDEN_AXES = ("activation_batch", "activation_length", "activation_embed")
# The KV cache [layers, B, kv_heads, S, head_dim]: rows and heads sharded like the activations.
# Heads before slots: a decode step's attention reads each (row, head)'s keys as one contiguous
# [S, head_dim] block, with no transpose of the cache per token.
_CACHE_AXES = (None, "activation_batch", "activation_kv_heads", None, None)


def _dtype(name: str):
  """A dtype by name; "auto" is float32 on CPU and bfloat16 on GPU/TPU."""
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return jnp.dtype(name)


def compute_dtype(cfg: ModelConfig):
  """The dtype activations (and sampling's weights) are computed in."""
  return _dtype(cfg.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies of the rotary embedding, with HF's `linear` and `llama3` scalings."""
  d = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
  scaling = cfg.rope_scaling_dict
  kind = scaling.get("rope_type", "default")
  if kind == "linear":
    inv_freq = inv_freq / scaling["factor"]
  elif kind == "llama3":
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
  """x: [B, T, H, D]; positions: [B, T]. HF's rotate-half convention."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * scale.astype(self.dtype)


class Projection(nn.Module):
  """A linear map between named multi-axis shapes, with optional bias and LoRA adapter.

  `x[..., *in_shape] -> y[..., *out_shape]`; the kernel is [*in_shape, *out_shape].
  """
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  in_axes: tuple[str, ...]
  out_axes: tuple[str, ...]
  cfg: ModelConfig
  use_bias: bool = False
  lora: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    dtype, pdtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    fan_in = int(np.prod(self.in_shape))
    init = nn.initializers.normal(cfg.initializer_range)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.in_axes + self.out_axes),
                        self.in_shape + self.out_shape, pdtype)
    # As one 2-D matmul [tokens, fan_in] x [fan_in, fan_out]: XLA's CPU backend runs the
    # multi-axis einsum form (and its weight gradient) ~30% slower; the reshapes are free.
    fan_out = int(np.prod(self.out_shape))
    lead = x.shape[:x.ndim - len(self.in_shape)]
    x2 = x.reshape(-1, fan_in).astype(dtype)
    y = x2 @ kernel.reshape(fan_in, fan_out).astype(dtype)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.out_axes),
                        self.out_shape, pdtype)
      y = y + bias.reshape(fan_out).astype(dtype)
    if self.lora:
      r = cfg.lora_rank
      a = self.param("lora_a", nn.with_logical_partitioning(
          nn.initializers.normal(1.0 / np.sqrt(fan_in)), self.in_axes + ("lora_rank",)),
                     self.in_shape + (r,), pdtype)
      b = self.param("lora_b", nn.with_logical_partitioning(
          nn.initializers.zeros, ("lora_rank",) + self.out_axes), (r,) + self.out_shape, pdtype)
      low = x2 @ a.reshape(fan_in, r).astype(dtype)
      y = y + (cfg.lora_alpha / r) * (low @ b.reshape(r, fan_out).astype(dtype))
    y = y.reshape(lead + self.out_shape)
    return y


def _proj(cfg: ModelConfig, name: str, in_shape, out_shape, in_axes, out_axes, use_bias=False):
  return Projection(tuple(in_shape), tuple(out_shape), tuple(in_axes), tuple(out_axes), cfg,
                    use_bias=use_bias, lora=cfg.lora_rank > 0 and name in cfg.lora_targets,
                    name=name)


class Attention(nn.Module):
  """Grouped-query self-attention with rotary positions; with a KV cache, over the cached slots.

  `cache` is None or the whole (keys, values) cache [layers, B, kv_heads, S, head_dim] (or one
  layer's, [1, ...], with `layer` 0): this layer's new keys/values are written in place at
  [layer, :, :, cache_index] and it is returned.
  `prefill`: the cache is empty and these are its first tokens, so they attend only to each other
  (self-attention over T keys, any implementation) instead of over all S cache slots.
  """
  cfg: ModelConfig
  prefill: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache, layer, cache_index, cache_segments):
    cfg = self.cfg
    e, h, kvh, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = _proj(cfg, "q", (e,), (h, d), ("embed",), ("heads", "head_dim"), cfg.qkv_bias)(x)
    k = _proj(cfg, "k", (e,), (kvh, d), ("embed",), ("kv_heads", "head_dim"), cfg.qkv_bias)(x)
    v = _proj(cfg, "v", (e,), (kvh, d), ("embed",), ("kv_heads", "head_dim"), cfg.qkv_bias)(x)
    inv_freq = rope_inv_freq(cfg)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
    k = nn.with_logical_constraint(k, ("activation_batch", "activation_length", "activation_kv_heads", None))
    q = checkpoint_name(q, "query_proj")
    k = checkpoint_name(k, "key_proj")
    v = checkpoint_name(v, "value_proj")

    if cache is None:  # Training / scoring.
      out = attention.self_attention(cfg.attention, q, k, v, segment_ids)
    else:
      t = x.shape[1]
      ck, cv = cache
      if ck.ndim == 4:  # One layer's own cache (Transformer(unrolled=True)).
        write = lambda c, new: nn.with_logical_constraint(jax.lax.dynamic_update_slice(
            c, jnp.swapaxes(new, 1, 2).astype(c.dtype), (0, 0, cache_index, 0)), _CACHE_AXES[1:])
        read = lambda c: c
      else:
        write = lambda c, new: nn.with_logical_constraint(jax.lax.dynamic_update_slice(
            c, jnp.swapaxes(new, 1, 2)[None].astype(c.dtype), (layer, 0, 0, cache_index, 0)),
            _CACHE_AXES)
        read = lambda c: jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False)
      cache = (write(ck, k), write(cv, v))
      if self.prefill:
        out = attention.self_attention(cfg.attention, q, k, v, segment_ids)
      else:
        keys, values = map(read, cache)
        out = attention.cached_attention(cfg.attention, q, keys, values,
                                         cache_index + jnp.arange(t), segment_ids, cache_segments)
    out = checkpoint_name(out, "context")
    out = _proj(cfg, "o", (h, d), (e,), ("heads", "head_dim"), ("embed",))(out)
    return checkpoint_name(out, "out_proj"), cache


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    e, f = cfg.hidden_size, cfg.intermediate_size
    gate = checkpoint_name(_proj(cfg, "gate", (e,), (f,), ("embed",), ("mlp",))(x), "mlp_gate")
    up = checkpoint_name(_proj(cfg, "up", (e,), (f,), ("embed",), ("mlp",))(x), "mlp_up")
    hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up,
                                        ("activation_batch", "activation_length", "activation_mlp"))
    return checkpoint_name(_proj(cfg, "down", (f,), (e,), ("mlp",), ("embed",))(hidden), "mlp_down")


class DecoderLayer(nn.Module):
  """One pre-norm block. Scanned: ((hidden, cache), layer index) -> ((hidden, cache), None)."""
  cfg: ModelConfig
  prefill: bool = False

  @nn.compact
  def __call__(self, carry, layer, positions, segment_ids, cache_index, cache_segments):
    cfg = self.cfg
    dtype, pdtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    x, cache = carry
    x = nn.with_logical_constraint(x, _HIDDEN_AXES)
    h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="attn_norm")(x)
    attn, cache = Attention(cfg, self.prefill, name="attn")(h, positions, segment_ids, cache, layer,
                                                            cache_index, cache_segments)
    x = x + attn
    h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="mlp_norm")(x)
    x = x + Mlp(cfg, name="mlp")(h)
    return (x, cache), None


# The activations a layer names with `checkpoint_name`, for the remat policies below.
_QKV = ("query_proj", "key_proj", "value_proj")
_PROJECTIONS = _QKV + ("out_proj", "mlp_gate", "mlp_up", "mlp_down")
ACTIVATIONS = _PROJECTIONS + ("context",)  # context: the attention's output, before `o`.


def _offload(names: tuple[str, ...]):
  return jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=[], names_which_can_be_offloaded=list(names),
      offload_src="device", offload_dst="pinned_host")


# `model.remat` -> what each layer keeps for the backward pass; everything else is recomputed from
# the layer's input. Fewer kept activations: less memory, more recompute. `minimal` keeps every
# projection output and recomputes only the attention itself (and the elementwise ops);
# `minimal_with_context` keeps the attention output too (with splash also its residuals). The
# `_offload` variants move what they keep to pinned host memory and back for the backward pass.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "minimal": jax.checkpoint_policies.save_only_these_names(*_PROJECTIONS),
    "minimal_with_context": jax.checkpoint_policies.save_only_these_names(*ACTIVATIONS),
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(*_QKV),
    "save_out_proj": jax.checkpoint_policies.save_only_these_names("out_proj"),
    "minimal_offload": _offload(_PROJECTIONS),
    "save_qkv_proj_offload": _offload(_QKV),
}


class Transformer(nn.Module):
  """`prefill=True`: the call fills an empty KV cache with the prompt (see Attention).

  `unrolled=True`: the layers are a Python loop over `layer_{i}` modules instead of the scan (the
  parameters as `unstack_layers` gives them; the KV cache as `init_cache(..., unrolled=True)`
  gives it, one array per layer). Sampling uses it where the scan's per-layer views into the
  stacked cache are copies (XLA:CPU copies each layer's whole [B, kv_heads, S, head_dim] cache
  before the attention's matmul, twice per layer and token).
  """
  cfg: ModelConfig
  prefill: bool = False
  unrolled: bool = False

  def setup(self):
    cfg = self.cfg
    pdtype = _dtype(cfg.param_dtype)
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range),
                                                  ("vocab", "embed")),
        (cfg.vocab_size, cfg.hidden_size), pdtype)
    layer = DecoderLayer
    if self.unrolled:
      self.layers = [layer(cfg, self.prefill, name=f"layer_{i}") for i in range(cfg.num_layers)]
    elif cfg.remat != "none":
      layer = nn.remat(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    if not self.unrolled:
      self.layers = nn.scan(
          layer, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})(
              cfg, self.prefill, name="layers")
    self.final_norm = RMSNorm(cfg.rms_norm_eps, _dtype(cfg.dtype), pdtype, name="final_norm")
    if not cfg.tie_word_embeddings:
      self.lm_head = self.param(
          "lm_head", nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range),
                                                  ("embed", "vocab")),
          (cfg.hidden_size, cfg.vocab_size), pdtype)

  def __call__(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None, *, cache: dict | None = None,
               return_hidden: bool = False):
    """tokens [B, T] -> logits [B, T, V] (float32), or final hidden states [B, T, E].

    positions default to 0..T-1 and segment_ids to all ones. With `cache` (see `init_cache`) the
    new keys/values are written at cache["index"] and (output, new_cache) is returned.
    """
    cfg = self.cfg
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    x = jnp.take(self.embedding, tokens, axis=0).astype(_dtype(cfg.dtype))
    x = nn.with_logical_constraint(x, _HIDDEN_AXES)  # Batch-sharded from the first layer on.
    if cache is None:
      kv, index, cache_segments = None, None, None
    else:
      kv, index = (cache["k"], cache["v"]), cache["index"]
      cache_segments = jax.lax.dynamic_update_slice_in_dim(
          cache["segment_ids"], segment_ids.astype(jnp.int32), index, axis=1)
    if self.unrolled:  # Layer i's cache is its own [B, kv_heads, S, head_dim] array.
      per_layer = list(zip(*kv)) if kv is not None else [None] * cfg.num_layers
      for i, layer in enumerate(self.layers):
        (x, per_layer[i]), _ = layer((x, per_layer[i]), 0, positions, segment_ids, index,
                                     cache_segments)
      kv = tuple(map(tuple, zip(*per_layer))) if kv is not None else None
    else:
      layer_index = jnp.arange(cfg.num_layers, dtype=jnp.int32)
      (x, kv), _ = self.layers((x, kv), layer_index, positions, segment_ids, index, cache_segments)
    x = nn.with_logical_constraint(self.final_norm(x), _HIDDEN_AXES)
    out = x if return_hidden else self.logits(x)
    if cache is None:
      return out
    new_cache = {"k": kv[0], "v": kv[1], "segment_ids": cache_segments, "index": index + t}
    return out, new_cache

  def logits(self, hidden: Array) -> Array:
    kernel = self.embedding.T if self.cfg.tie_word_embeddings else self.lm_head
    return jnp.einsum("...e,ev->...v", hidden, kernel.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)


def unstack_layers(params: dict, cfg: ModelConfig) -> dict:
  """The parameters of `Transformer(unrolled=True)`: the scan's stacked `layers` [L, ...] split
  into `layer_0` ... `layer_{L-1}` (one copy of the layers' weights)."""
  params = dict(params)
  stacked = params.pop("layers")
  params.update({f"layer_{i}": jax.tree.map(lambda p, i=i: p[i], stacked)
                 for i in range(cfg.num_layers)})
  return params


def lm_head_kernel(params: dict, cfg: ModelConfig) -> Array:
  """The [E, V] output projection (the transposed embedding when tied)."""
  return params["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None, unrolled: bool = False) -> dict:
  """An empty KV cache: k/v [L, B, kv_heads, S, head_dim] (`unrolled`: a tuple of L arrays
  [B, kv_heads, S, head_dim], for `Transformer(unrolled=True)`), slot segments [B, S] (0 = empty)."""
  dtype = dtype or _dtype(cfg.dtype)
  shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  array = lambda *lead: nn.with_logical_constraint(jnp.zeros(lead + shape, dtype),
                                                   _CACHE_AXES[1 - len(lead):])
  zeros = ((lambda: tuple(array() for _ in range(cfg.num_layers))) if unrolled
           else lambda: array(cfg.num_layers))
  return {"k": zeros(), "v": zeros(),
          "segment_ids": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.zeros((), jnp.int32)}


def _boxed_abstract_params(cfg: ModelConfig):
  model = Transformer(cfg)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))[
      "params"]


def abstract_params(cfg: ModelConfig):
  """ShapeDtypeStructs of the parameters (the unboxed tree), without allocating."""
  return nn.unbox(_boxed_abstract_params(cfg))


def logical_axes(cfg: ModelConfig):
  """Pytree of logical PartitionSpecs, one per parameter."""
  return nn.get_partition_spec(_boxed_abstract_params(cfg))


def _init(cfg: ModelConfig, rng: Array):
  return nn.unbox(Transformer(cfg).init(rng, jnp.zeros((1, 1), jnp.int32))["params"])


_init_default = jax.jit(_init, static_argnums=0)


def init_params(cfg: ModelConfig, rng: Array, shardings=None, select=None):
  """Random parameters, created directly with `shardings` (pytree of Sharding) if given.

  `select(params) -> subtree` returns only part of them (e.g. the LoRA adapters); the rest is never
  computed (XLA drops what the jitted function does not return). `shardings` then match the part.
  """
  if shardings is None and select is None:
    return _init_default(cfg, rng)
  fn = (lambda c, k: select(_init(c, k))) if select is not None else _init
  return jax.jit(fn, static_argnums=0, out_shardings=shardings)(cfg, rng)
