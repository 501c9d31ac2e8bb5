"""The decode loop reads weights already in the compute dtype, and updates the KV cache in place
(the scan over stacked layers and the unrolled per-layer layout alike).

Both are checked on the traced program (jaxpr), which keeps the code's structure: XLA may hoist a
loop-invariant cast out of the loop on one backend and not on another, so the compiled program
could hide a cast that the code does per token.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxykd.models.config import preset
from proxykd.models.sampling import MAX_EOS, MAX_STOP, MAX_STOP_LEN, _decode_program
from proxykd.models.transformer import init_params

NEW, PROMPT = 16, 16


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (list, tuple)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _eqns(jaxpr, inside_while: bool = False):
  """(eqn, whether it runs inside a while loop's body or condition), recursively."""
  for eqn in jaxpr.eqns:
    yield eqn, inside_while
    for sub in _sub_jaxprs(eqn):
      yield from _eqns(sub, inside_while or eqn.primitive.name == "while")


def _converted_in_loops(closed, min_size: int = 1024) -> list[tuple[int, ...]]:
  """Shapes of float32 arrays of at least `min_size` elements cast to bfloat16 inside a loop."""
  found = []
  for eqn, in_loop in _eqns(closed.jaxpr):
    if in_loop and eqn.primitive.name == "convert_element_type":
      src, dst = eqn.invars[0].aval, eqn.outvars[0].aval
      if src.dtype == jnp.float32 and dst.dtype == jnp.bfloat16 and src.size >= min_size:
        found.append(tuple(src.shape))
  return found


def _decode_jaxpr(cfg, params, batch: int = 1, unrolled: bool = False):
  args = (params, np.zeros((batch, PROMPT), np.int32), np.ones((batch, PROMPT), np.int32),
          np.full(MAX_EOS, -1, np.int32), np.full((MAX_STOP, MAX_STOP_LEN), -1, np.int32),
          jax.random.PRNGKey(0), np.float32(0), np.float32(1), np.int32(0), np.int32(NEW))
  return jax.make_jaxpr(_decode_program(cfg, NEW, 0, unrolled))(*args)


def test_the_checker_sees_a_cast_inside_a_loop():
  w, x = jnp.ones((64, 64)), jnp.ones((1, 64), jnp.bfloat16)
  step = lambda w: lambda c: (c[0] + 1, jnp.tanh(c[1] @ w.astype(jnp.bfloat16)))
  loop = lambda w, x, body: jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]
  assert _converted_in_loops(jax.make_jaxpr(lambda w, x: loop(w, x, step(w)))(w, x)) == [(64, 64)]
  hoisted = lambda w, x: loop(w, x, step(w.astype(jnp.bfloat16)))
  assert _converted_in_loops(jax.make_jaxpr(hoisted)(w, x)) == []


@pytest.mark.parametrize("unrolled", [False, True])
def test_decode_loop_reads_bf16_weights_from_float32_master_weights(unrolled):
  cfg = preset("tiny", dtype="bfloat16", param_dtype="float32")
  params = init_params(cfg, jax.random.PRNGKey(0))
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  assert _converted_in_loops(_decode_jaxpr(cfg, params, unrolled=unrolled)) == []


def test_kv_cache_is_carried_through_the_layers_not_restacked():
  """Inside the decode loop the layer scan carries the whole cache (each layer writes its new slot
  in place) instead of taking it as per-layer inputs and stacking new per-layer outputs."""
  cfg = preset("tiny")
  params = init_params(cfg, jax.random.PRNGKey(0))
  cache_shape = (cfg.num_layers, 1, cfg.num_kv_heads, PROMPT + NEW, cfg.head_dim)
  scans = [eqn for eqn, in_loop in _eqns(_decode_jaxpr(cfg, params).jaxpr)
           if in_loop and eqn.primitive.name == "scan"]
  assert scans
  for scan in scans:
    consts, carry = scan.params["num_consts"], scan.params["num_carry"]
    shapes = lambda vs: [tuple(v.aval.shape) for v in vs]
    assert shapes(scan.invars[consts:consts + carry]).count(cache_shape) == 2  # keys and values
    assert cache_shape not in shapes(scan.invars[consts + carry:])  # not scanned over
    assert cache_shape not in shapes(scan.outvars[carry:])  # not stacked as outputs


def test_unrolled_layers_keep_each_cache_as_its_own_loop_carry():
  """Unrolled, each layer's [B, kv_heads, S, head_dim] keys and values are carried by the decode
  loop as they are: never sliced out of (or stacked into) a bigger array inside the loop."""
  cfg = preset("tiny")
  params = init_params(cfg, jax.random.PRNGKey(0))
  layer_cache = (1, cfg.num_kv_heads, PROMPT + NEW, cfg.head_dim)
  loops = [eqn for eqn, _ in _eqns(_decode_jaxpr(cfg, params, unrolled=True).jaxpr)
           if eqn.primitive.name == "while"]
  assert len(loops) == 1
  carried = [tuple(v.aval.shape) for v in loops[0].invars]
  assert carried.count(layer_cache) == 2 * cfg.num_layers
  for eqn, in_loop in _eqns(_decode_jaxpr(cfg, params, unrolled=True).jaxpr):
    if in_loop and eqn.primitive.name in ("dynamic_slice", "slice", "concatenate", "scan"):
      assert all(len(v.aval.shape) < 4 or v.aval.size < np.prod(layer_cache)
                 for v in eqn.invars if hasattr(v, "aval")), eqn
