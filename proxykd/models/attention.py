"""Attention implementations behind one interface, chosen by `model.attention`.

Every implementation computes softmax(q k^T / sqrt(d)) v for queries q [B, T, H, D] over keys and
values [B, S, KVH, D] (grouped-query attention: query head h reads kv head h // (H / KVH)) under
one mask: a query sees the keys of its own segment (packed documents; segment 0 is padding or an
empty cache slot) at absolute indices up to its own.

- `xla`: the reference and the CPU path; einsums with a float32 softmax. Causal self-attention is
  cut into query blocks so that the all-masked upper triangle is never computed (`causal_blocks`).
- `cudnn` (NVIDIA GPU, bfloat16/float16): `jax.nn.dot_product_attention(implementation="cudnn")`
  with `is_causal` (cuDNN skips the upper triangle) and the segment mask as its boolean `mask`
  (cuDNN takes it as an additive [B, 1, T, S] bias). GQA is native.
- `pallas_gpu` (GPU): the Pallas (Triton) flash kernel `jax.experimental.pallas.ops.gpu.attention`,
  which reads segment ids directly (no [T, S] tensor at all); GQA by repeating the kv heads.
- `splash` (TPU): Pallas splash attention with segment ids and a causal mask; GQA is native.
- `auto`: on a CUDA GPU cudnn (when a probe compile shows this cuDNN takes the masked backward),
  else pallas_gpu; on TPU splash; else xla; each only where it supports the inputs (dtype, head
  dim, length), falling back to xla. The choice is logged once per distinct case. The GPU order
  is a default until measured: bench/accel.py times every implementation on the device.

A name whose backend is absent (cudnn on a CPU, splash on a GPU) runs xla with a warning, so a
config or checkpoint written on one machine runs on another; a name whose backend is present but
that cannot take the inputs (cudnn with float32) is an error naming `model.attention`.

With a KV cache (sampling) the queries sit at a traced offset in the cache, which the Pallas
kernels' static masks cannot express: their cached path is xla. `cudnn`, whose mask is general,
serves the prefill (T > 1); single-token decode is xla everywhere (a memory-bound read of the
cache, which a fused kernel does not speed up).

On a mesh (jax.set_mesh, as proxykd/train/sharding.py `mesh_context` does) the fused kernels run
under `shard_map`, rows split like the activations' batch and heads like `activation_heads`, each
device attending over its own slice; xla is partitioned by GSPMD. `pallas_interpret()` runs the
Pallas kernels on the CPU in interpret mode, for tests.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

from proxykd.models.config import ATTENTION_IMPLEMENTATIONS

Array = jax.Array
_NEG_INF = -1e30
# Logical axes of q and of k, v (proxykd/train/sharding.py maps them to the mesh).
_Q_AXES = ("activation_batch", "activation_length", "activation_heads", None)
_KV_AXES = ("activation_batch", "activation_length", "activation_kv_heads", None)
# The platforms each fused kernel runs on (cpu too for the Pallas ones under pallas_interpret()),
# and auto's order of preference (cuDNN before the Triton kernel: bench/accel.py's attention rows
# time both on the device).
_PLATFORMS = {"cudnn": ("cuda",), "pallas_gpu": ("cuda", "rocm"), "splash": ("tpu",)}
_AUTO_ORDER = {"cuda": ("cudnn", "pallas_gpu"), "rocm": ("pallas_gpu",), "tpu": ("splash",)}
_interpret = False
_logged: set[tuple] = set()


# ----------------------------------------------------------------------------- the XLA reference
def attention_mask(q_index: Array, q_segments: Array, kv_segments: Array) -> Array:
  """[B, 1, 1, T, S] boolean: causal by absolute index, and within the same segment.

  q_index: [T] absolute index of each query in the key sequence; q_segments: [B, T];
  kv_segments: [B, S]. A key slot whose segment is 0 (padding or an empty cache slot) is visible
  only to padding queries, so every query row keeps at least one key (its own slot).
  """
  causal = jnp.arange(kv_segments.shape[1])[None, :] <= q_index[:, None]  # [T, S]
  same = q_segments[:, :, None] == kv_segments[:, None, :]  # [B, T, S]
  return (causal[None] & same)[:, None, None]


def causal_blocks(t: int, min_block: int = 128, max_blocks: int = 8) -> int:
  """How many query blocks to split a causal self-attention of length t into.

  Query block i only needs keys [0, end of block i): with n blocks, (n-1)/2n of the score matrix
  (its upper triangle) is never computed. Measured on CPU at T=512, 4 blocks halve the attention's
  forward+backward time.
  """
  blocks = min(max_blocks, t // min_block)
  while blocks > 1 and t % blocks:
    blocks -= 1
  return max(blocks, 1)


def xla_attention(q: Array, keys: Array, values: Array, q_index: Array, q_segments: Array,
                  kv_segments: Array, heads_major: bool = False) -> Array:
  """Grouped-query attention of q [B, T, H, D] over keys/values [B, S, KVH, D] (`heads_major`:
  [B, KVH, S, D], the KV cache's layout)."""
  b, t, h, d = q.shape
  kvh = keys.shape[1 if heads_major else 2]
  kv = "bksd" if heads_major else "bskd"
  qg = q.reshape(b, t, kvh, h // kvh, d)
  scores = jnp.einsum(f"btkgd,{kv}->bkgts", qg, keys.astype(q.dtype),
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  scores = jnp.where(attention_mask(q_index, q_segments, kv_segments), scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  if heads_major:  # Batch dims leading in the output too: one plain batched matmul, no transpose.
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, values.astype(q.dtype))
    return jnp.moveaxis(out, 3, 1).reshape(b, t, h, d)
  return jnp.einsum("bkgts,bskd->btkgd", probs, values.astype(q.dtype)).reshape(b, t, h, d)


def xla_self_attention(q: Array, k: Array, v: Array, segment_ids: Array) -> Array:
  """Causal self-attention by query blocks: block i attends to keys [0, end of block i)."""
  t = q.shape[1]
  blocks = causal_blocks(t)
  size = t // blocks
  return jnp.concatenate([
      xla_attention(q[:, i * size:(i + 1) * size], k[:, :(i + 1) * size], v[:, :(i + 1) * size],
                    jnp.arange(i * size, (i + 1) * size), segment_ids[:, i * size:(i + 1) * size],
                    segment_ids[:, :(i + 1) * size]) for i in range(blocks)], axis=1)


# ----------------------------------------------------------------------------- fused kernels
def cudnn_attention(q: Array, keys: Array, values: Array, q_index: Array, q_segments: Array,
                    kv_segments: Array, *, is_causal: bool, implementation: str = "cudnn") -> Array:
  """`jax.nn.dot_product_attention` under our mask; `implementation="xla"` runs the very same call
  through JAX's XLA path (how the CPU tests check everything but the kernel itself).

  `is_causal` (self-attention, queries at 0..T-1) lets cuDNN skip the upper triangle; the mask
  still carries it, so both agree.
  """
  mask = attention_mask(q_index, q_segments, kv_segments)[:, 0]  # [B, 1, T, S]
  return jax.nn.dot_product_attention(
      q, keys.astype(q.dtype), values.astype(q.dtype), mask=mask, is_causal=is_causal,
      scale=q.shape[-1] ** -0.5, implementation=implementation)


def _pow2_block(n: int, largest: int) -> int:
  """The largest power of two <= `largest` that divides n."""
  block = largest
  while block > 1 and n % block:
    block //= 2
  return block


def pallas_gpu_attention(q: Array, k: Array, v: Array, segment_ids: Array, *,
                         interpret: bool = False) -> Array:
  """Causal self-attention with segment ids by the Pallas/Triton flash kernel (kv heads repeated
  to the query heads: the kernel has no GQA)."""
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention  # pylint: disable=g-import-not-at-top
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  block = _pow2_block(q.shape[1], 128)
  backward = _pow2_block(q.shape[1], 32)
  sizes = gpu_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=backward,
                                   block_kv_dkv=backward, block_q_dq=backward, block_kv_dq=backward)
  return gpu_attention.mha(q, k.astype(q.dtype), v.astype(q.dtype), segment_ids.astype(jnp.int32),
                           sm_scale=q.shape[-1] ** -0.5, causal=True, block_sizes=sizes,
                           interpret=interpret)


def _splash_block(t: int) -> int:
  return next(b for b in (512, 256, 128) if t % b == 0)


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, *,
                     interpret: bool = False) -> Array:
  """Causal self-attention with segment ids by TPU splash attention (one kernel per row, vmapped).

  Its residuals are named `context`, so a remat policy that keeps the context keeps them too.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top
  _, t, h, d = q.shape
  block = _splash_block(t)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((t, t))] * h)
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  residual_checkpoint_name="context", interpret=interpret)
  heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, N, D] -> [B, N, T, D]
  qh = heads_major(q * jnp.asarray(d ** -0.5, q.dtype))  # splash does not scale the scores
  kh, vh = heads_major(k.astype(q.dtype)), heads_major(v.astype(q.dtype))
  seg = segment_ids.astype(jnp.int32)
  out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(s1, s1)))(
      qh, kh, vh, seg)
  return jnp.swapaxes(out, 1, 2)


# ----------------------------------------------------------------------------- choosing one
@contextlib.contextmanager
def pallas_interpret() -> Iterator[None]:
  """Within it, the Pallas kernels (pallas_gpu, splash) run on the CPU in interpret mode (tests)."""
  global _interpret
  before, _interpret = _interpret, True
  try:
    yield
  finally:
    _interpret = before


def platform() -> str:
  """cpu | tpu | cuda | rocm: where the default backend's computations run."""
  backend = jax.default_backend()
  if backend != "gpu":
    return backend
  from jax.extend import backend as jex_backend  # pylint: disable=g-import-not-at-top
  return "cuda" if "cuda" in jex_backend.get_backend().platform_version.lower() else "rocm"


def runnable_here() -> list[str]:
  """The implementations that run on this platform (xla first), interpret mode aside."""
  plat = platform()
  return ["xla"] + [name for name, places in _PLATFORMS.items() if plat in places]


def _log_once(level: Callable, message: str, *args) -> None:
  key = (message,) + args
  if key not in _logged:
    _logged.add(key)
    level(message, *args)


def _unsupported(name: str, dtype, head_dim: int, length: int, cached: bool) -> str | None:
  """Why `name` cannot compute this attention (a causal self-attention of `length` tokens, or
  queries over a KV cache of `length` slots), or None if it can."""
  dtype = jnp.dtype(dtype)
  if cached and name in ("pallas_gpu", "splash"):
    return "its mask cannot follow queries at a traced offset in a KV cache"
  if name == "cudnn":
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      return f"cuDNN attention computes in bfloat16/float16, not {dtype.name} (model.dtype)"
    if head_dim % 8 or head_dim > 128:
      return f"cuDNN attention needs a head_dim that is a multiple of 8 up to 128, not {head_dim}"
    if not cached and length % 2:
      return f"cuDNN attention with a mask needs an even sequence length, not {length}"
  if name == "pallas_gpu" and length % 16:
    return f"the Pallas GPU kernel needs a sequence length that is a multiple of 16, not {length}"
  if name == "splash" and length % 128:
    return f"splash attention needs a sequence length that is a multiple of 128, not {length}"
  return None


@functools.cache
def cudnn_takes_masked_backward(dtype_name: str, head_dim: int,
                                implementation: str = "cudnn") -> bool:
  """Whether this cuDNN compiles our masked attention's forward and backward (a tiny probe,
  compiled once per dtype and head_dim): the gradient of a [B, 1, T, S] bias with B > 1 needs a
  recent cuDNN. `implementation` exists so that the probe itself can be tested on the CPU."""
  dtype = jnp.dtype(dtype_name)
  shape = lambda *s: jax.ShapeDtypeStruct(s, dtype)
  segments = jax.ShapeDtypeStruct((2, 128), jnp.int32)

  def loss(q, k, v, seg):
    out = cudnn_attention(q, k, v, jnp.arange(128), seg, seg, is_causal=True,
                          implementation=implementation)
    return jnp.sum(out.astype(jnp.float32))

  try:
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        shape(2, 128, 2, head_dim), shape(2, 128, 1, head_dim), shape(2, 128, 1, head_dim),
        segments).compile()
    return True
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("attention: cuDNN does not compile masked attention with its gradient "
                    "(%s: %s); auto will not choose it", type(e).__name__, str(e)[:300])
    return False


def resolve(requested: str, dtype, head_dim: int, length: int, cached: bool = False) -> str:
  """The implementation that computes this attention for `requested` (a name of
  ATTENTION_IMPLEMENTATIONS) on this platform; see the module docstring for the rules."""
  if requested not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"model.attention must be one of {'|'.join(ATTENTION_IMPLEMENTATIONS)}, "
                     f"got {requested!r}")
  if requested == "xla":
    return "xla"
  plat = platform()
  if requested != "auto":
    if not (plat in _PLATFORMS[requested] or (
        _interpret and plat == "cpu" and requested in ("pallas_gpu", "splash"))):
      _log_once(logging.warning, "attention: model.attention=%s does not run on %s: using xla",
                requested, plat)
      return "xla"
    if cached and requested in ("pallas_gpu", "splash"):
      return "xla"
    reason = _unsupported(requested, dtype, head_dim, length, cached)
    if reason:
      raise ValueError(f"model.attention={requested}: {reason}; use model.attention=auto or xla")
    return requested
  chosen, why = "xla", f"no fused kernel on {plat}"
  for name in _AUTO_ORDER.get(plat, ()):
    reason = _unsupported(name, dtype, head_dim, length, cached)
    if reason is None and name == "cudnn" and not cached and not cudnn_takes_masked_backward(
        jnp.dtype(dtype).name, head_dim):
      reason = "this cuDNN does not compile the masked backward"
    if reason is None:
      chosen, why = name, f"preferred on {plat} and takes the inputs"
      break
    why = reason
  _log_once(logging.info, "attention: model.attention=auto uses %s for %s (%s; %s, head_dim %d, "
            "length %d)", chosen, "the KV cache" if cached else "self-attention", why,
            jnp.dtype(dtype).name, head_dim, length)
  return chosen


# ----------------------------------------------------------------------------- on a mesh
def _mesh_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _spec(shape: tuple[int, ...], logical: tuple, mesh) -> list[tuple[str, ...]]:
  """Per dimension, the mesh axes the logical rules put it on (kept only where they divide it)."""
  spec = tuple(nn.logical_to_mesh_axes(logical))
  spec = spec + (None,) * (len(shape) - len(spec))
  dims = []
  for size, entry in zip(shape, spec):
    axes = tuple(a for a in _mesh_axes(entry) if a in mesh.axis_names)
    dims.append(axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else ())
  return dims


def _on_mesh(kernel: Callable, q: Array, k: Array, v: Array, rows: tuple[Array, ...] = (),
             shared: tuple[Array, ...] = ()) -> Array:
  """kernel(q, k, v, *rows, *shared) on each device's slice under shard_map when a multi-device
  mesh is set: q/k/v and the [B, ...] arrays `rows` split by rows like the activations' batch,
  q/k/v by heads like activation_heads / activation_kv_heads (both or neither, so that every
  device's query heads find their kv heads); `shared` whole on every device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(q, k, v, *rows, *shared)
  q_dims, kv_dims = _spec(q.shape, _Q_AXES, mesh), _spec(k.shape, _KV_AXES, mesh)
  batch = q_dims[0] if q_dims[0] == kv_dims[0] else ()
  heads = q_dims[2] if q_dims[2] == kv_dims[2] else ()
  as_spec = lambda *dims: P(*[d if d else None for d in dims])
  qkv = as_spec(batch, (), heads, ())
  in_specs = (qkv, qkv, qkv, *[as_spec(batch, *[()] * (r.ndim - 1)) for r in rows],
              *[P() for _ in shared])
  return jax.shard_map(kernel, in_specs=in_specs, out_specs=qkv, check_vma=False)(
      q, k, v, *rows, *shared)


# ----------------------------------------------------------------------------- the interface
def self_attention(requested: str, q: Array, k: Array, v: Array, segment_ids: Array) -> Array:
  """Causal self-attention within segments (training, scoring): q [B, T, H, D], k/v [B, T, KVH, D],
  segment_ids [B, T] -> [B, T, H, D], by the implementation `requested` resolves to."""
  name = resolve(requested, q.dtype, q.shape[-1], q.shape[1])
  if name == "xla":
    return xla_self_attention(q, k, v, segment_ids)
  interpret = platform() == "cpu"
  if name == "cudnn":
    kernel = lambda q, k, v, s: cudnn_attention(q, k, v, jnp.arange(q.shape[1]), s, s,
                                                is_causal=True)
  elif name == "pallas_gpu":
    kernel = functools.partial(pallas_gpu_attention, interpret=interpret)
  else:
    kernel = functools.partial(splash_attention, interpret=interpret)
  return _on_mesh(kernel, q, k, v, rows=(segment_ids,))


def cached_attention(requested: str, q: Array, keys: Array, values: Array, q_index: Array,
                     q_segments: Array, kv_segments: Array) -> Array:
  """New queries q [B, T, H, D] at cache slots `q_index` [T] (segments q_segments [B, T]) over the
  whole cache keys/values [B, KVH, S, D] (the cache's heads-major layout; slot segments
  kv_segments [B, S]): a prefill (T > 1) by cudnn when `requested` resolves to it, everything else
  by xla (see the module docstring)."""
  if q.shape[1] > 1 and resolve(requested, q.dtype, q.shape[-1], keys.shape[2],
                                cached=True) == "cudnn":
    kernel = lambda q, k, v, qs, ks, qi: cudnn_attention(q, k, v, qi, qs, ks, is_causal=False)
    keys, values = (jnp.swapaxes(c, 1, 2) for c in (keys, values))
    return _on_mesh(kernel, q, keys, values, rows=(q_segments, kv_segments), shared=(q_index,))
  return xla_attention(q, keys, values, q_index, q_segments, kv_segments, heads_major=True)
