"""Autoregressive sampling with a KV cache, on a device mesh, compiled once per shape bucket.

Prompts are left-padded into one batch (pad slots get segment 0, so no real token attends to
them), prefilled in one forward, then decoded one token per step inside a `lax.while_loop` that
stops as soon as every row has produced an EOS or a stop sequence, or reached its token limit:
no host round-trip per token.

A `Sampler` compiles one program per (batch, prompt length, max_new_tokens) bucket, each rounded up
to a power of two, with everything else traced: temperature, top-p, top-k, the token limit, the
EOS ids and the stop sequences are array inputs, so changing them never recompiles. Each compile
is logged and counted (`Sampler.compiles`). Parameters are read in the compute dtype: they are
cast once per call, before the decode loop (bfloat16 weights stay as they are; float32 master
weights are never converted per token). On a mesh, pass the parameters' shardings and the batch
sharding; the batch is padded to a multiple of `batch_multiple` (the devices the batch is split
over).

Stop sequences are token-id sequences matched on the device against the last generated tokens
(stop STRINGS that tokenise differently in context are cut exactly on the host by the caller,
e.g. proxykd/teacher/backend.py `truncate`). Log-probabilities are those of the model's
untempered distribution (as OpenAI reports them).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from proxykd import hosts
from proxykd.models.config import ModelConfig
from proxykd.models.transformer import (Transformer, compute_dtype, init_cache, lm_head_kernel,
                                        unstack_layers)

MAX_EOS = 8  # EOS ids per call (padded with -1)
MAX_STOP, MAX_STOP_LEN = 4, 16  # stop sequences per call and tokens per sequence
TOP_LOGPROBS = 20  # the top-k log-probs are computed for this many when any are asked for


@dataclasses.dataclass
class Generation:
  tokens: list[int]  # Generated ids, up to and including the EOS / stop sequence if one ended it.
  logprobs: list[float]  # log p(token) under the model, per generated token.
  top_logprobs: list[list[tuple[int, float]]]  # Per token, the k most likely (id, logprob).
  finish_reason: str  # "stop" (EOS or a stop sequence) or "length".


def bucket(n: int, minimum: int) -> int:
  """The smallest power of two >= max(n, minimum)."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def filter_logits(logits, temperature, top_p, top_k):
  """Tempered logits [B, V] with everything outside the top-k and the nucleus set to -inf.

  temperature, top_p (1: off) and top_k (0: off) are traced scalars; the sort only runs when a
  filter is on (lax.cond).
  """
  logits = logits / jnp.maximum(temperature, 1e-6)

  def filtered(logits):
    sorted_desc = -jnp.sort(-logits, axis=-1)
    v = logits.shape[-1]
    kth = jnp.take(sorted_desc, jnp.clip(jnp.where(top_k > 0, top_k, v) - 1, 0, v - 1), axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
    # The nucleus keeps sorted entries whose mass above is < top_p (the first always).
    cutoff = jnp.min(jnp.where(before < top_p, sorted_desc, jnp.inf), axis=-1)
    return jnp.where((logits >= kth[:, None]) & (logits >= cutoff[:, None]), logits, -jnp.inf)

  return jax.lax.cond((top_p < 1.0) | (top_k > 0), filtered, lambda x: x, logits)


def _pick(logits, rng, temperature, top_p, top_k):
  """One id per row from float32 logits [B, V]: argmax when temperature <= 0, else a sample (the
  random draw only runs when sampling: lax.cond)."""
  sample = lambda l: jax.random.categorical(rng, filter_logits(l, temperature, top_p, top_k),
                                            axis=-1).astype(jnp.int32)
  greedy = lambda l: jnp.argmax(l, axis=-1).astype(jnp.int32)
  return jax.lax.cond(temperature > 0.0, sample, greedy, logits)


def _stopped(tail, stop_ids):
  """Rows whose last tokens end with one of the stop sequences. tail [B, L]: the last L tokens
  (-2 before any); stop_ids [S, L], right-aligned, -1 = no token (and all -1 = no sequence)."""
  match = (stop_ids[None] == -1) | (tail[:, None, :] == stop_ids[None])
  real = jnp.any(stop_ids != -1, axis=-1)
  return jnp.any(jnp.all(match, axis=-1) & real[None], axis=-1)


def _decode_program(cfg: ModelConfig, max_new_tokens: int, top_k_logprobs: int,
                    unrolled: bool = False):
  """The jittable generate(params, tokens, segments, eos_ids, stop_ids, rng, temperature, top_p,
  top_k, limit) for one bucket."""
  model = Transformer(cfg, unrolled=unrolled)
  dtype = compute_dtype(cfg)

  def generate(params, tokens, segments, eos_ids, stop_ids, rng, temperature, top_p, top_k, limit):
    params = jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                          params)  # Once per call, outside the decode loop.
    if unrolled:
      params = unstack_layers(params, cfg)
    batch, prompt_len = tokens.shape
    head = lm_head_kernel(params, cfg)
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
    cache = init_cache(cfg, batch, prompt_len + max_new_tokens, unrolled=unrolled)
    hidden, cache = Transformer(cfg, prefill=True, unrolled=unrolled).apply(  # the prompt attends
        {"params": params}, tokens, positions, segments, cache=cache, return_hidden=True)  # to itself
    k = max(top_k_logprobs, 1)

    def emit(hidden_last, state, step):
      logits = jnp.einsum("be,ev->bv", hidden_last, head.astype(hidden_last.dtype),
                          preferred_element_type=jnp.float32)
      logp = jax.nn.log_softmax(logits, axis=-1)
      token = _pick(logits, jax.random.fold_in(rng, step), temperature, top_p, top_k)
      token = jnp.where(state["done"], 0, token)
      state = dict(state)
      state["out"] = state["out"].at[:, step].set(token)
      state["logp"] = state["logp"].at[:, step].set(jnp.take_along_axis(logp, token[:, None], 1)[:, 0])
      if top_k_logprobs:
        top_lp, top_id = jax.lax.top_k(logp, k)
        state["top_id"] = state["top_id"].at[:, step].set(top_id)
        state["top_lp"] = state["top_lp"].at[:, step].set(top_lp)
      tail = jnp.concatenate([state["tail"][:, 1:], token[:, None]], axis=1)
      ended = jnp.isin(token, eos_ids) | _stopped(tail, stop_ids)
      state["length"] = jnp.where(state["done"], state["length"], step + 1)
      state["stopped"] = state["stopped"] | (~state["done"] & ended)
      state["done"] = state["done"] | ended | (step + 1 >= limit)
      state["tail"], state["token"] = tail, token
      return state

    state = {
        "out": jnp.zeros((batch, max_new_tokens), jnp.int32),
        "logp": jnp.zeros((batch, max_new_tokens), jnp.float32),
        "top_id": jnp.zeros((batch, max_new_tokens, k) if top_k_logprobs else (1,), jnp.int32),
        "top_lp": jnp.zeros((batch, max_new_tokens, k) if top_k_logprobs else (1,), jnp.float32),
        "length": jnp.zeros((batch,), jnp.int32), "done": jnp.zeros((batch,), bool),
        "stopped": jnp.zeros((batch,), bool), "token": jnp.zeros((batch,), jnp.int32),
        "tail": jnp.full((batch, stop_ids.shape[1]), -2, jnp.int32), "cache": cache,
        "position": positions[:, -1] + 1, "step": jnp.ones((), jnp.int32),
    }
    state = emit(hidden[:, -1], state, 0)

    def cond(state):
      return (state["step"] < jnp.minimum(max_new_tokens, limit)) & ~jnp.all(state["done"])

    def body(state):
      hidden, cache = model.apply({"params": params}, state["token"][:, None],
                                  state["position"][:, None], jnp.ones((batch, 1), jnp.int32),
                                  cache=state["cache"], return_hidden=True)
      state = emit(hidden[:, 0], {**state, "cache": cache}, state["step"])
      return {**state, "position": state["position"] + 1, "step": state["step"] + 1}

    state = jax.lax.while_loop(cond, body, state)
    return (state["out"], state["logp"], state["top_id"], state["top_lp"], state["length"],
            state["stopped"])

  return generate


class Sampler:
  """Compiled, bucketed sampling for one model config (see the module docstring).

  `param_shardings`: the parameters' Shardings (None: wherever they are, one device);
  `batch_sharding`: a Sharding for the [batch, length] token inputs (None: replicated);
  `batch_multiple`: pad the batch to a multiple of this (the batch axis' device count);
  `context`: a context manager factory the programs are traced in (e.g. the mesh and logical
  axis rules: proxykd/train/sharding.py `mesh_context`); `min_batch`: the smallest batch bucket
  (a caller that samples in fixed-size batches passes that size, so a short last batch reuses the
  same program); `unroll_layers`: run the layers as a Python loop over per-layer weights and KV
  caches (`Transformer(unrolled=True)`) instead of the scan. None (default): on CPU, where the
  scan's per-layer slices of the stacked cache are copied every token (bench/eval.py: 1.9x the
  batch-64 decode speed); the scan elsewhere. Unrolling costs one copy of the layers' weights per
  call (none beyond the dtype cast when the weights are float32 and the compute bfloat16) and a
  program L times larger.
  """

  def __init__(self, cfg: ModelConfig, *, param_shardings=None, batch_sharding=None,
               batch_multiple: int = 1, context: Callable[[], ContextManager] | None = None,
               min_batch: int = 1, min_prompt_len: int = 16, min_new_tokens: int = 16,
               unroll_layers: bool | None = None):
    self.cfg = cfg
    self.param_shardings = param_shardings
    self.batch_sharding = batch_sharding
    self.batch_multiple = max(1, batch_multiple)
    self.context = context or contextlib.nullcontext
    self.min_batch, self.min_prompt_len, self.min_new_tokens = min_batch, min_prompt_len, min_new_tokens
    self.unroll_layers = (jax.default_backend() == "cpu") if unroll_layers is None else unroll_layers
    self._programs: dict[tuple, Any] = {}
    self.compiles = 0

  def _program(self, params, batch: int, prompt_len: int, new: int, top_k: int):
    key = (batch, prompt_len, new, top_k)
    if key not in self._programs:
      fn = _decode_program(self.cfg, new, top_k, self.unroll_layers)
      shape = lambda s, d, sh=None: jax.ShapeDtypeStruct(s, d, sharding=sh)
      abstract_params = jax.tree.map(lambda p: shape(p.shape, p.dtype), params)
      if self.param_shardings is not None:
        abstract_params = jax.tree.map(lambda a, s: shape(a.shape, a.dtype, s), abstract_params,
                                       self.param_shardings)
      scalar = lambda d: shape((), d)
      args = (abstract_params, shape((batch, prompt_len), jnp.int32, self.batch_sharding),
              shape((batch, prompt_len), jnp.int32, self.batch_sharding),
              shape((MAX_EOS,), jnp.int32), shape((MAX_STOP, MAX_STOP_LEN), jnp.int32),
              jax.eval_shape(lambda: jax.random.PRNGKey(0)), scalar(jnp.float32),
              scalar(jnp.float32), scalar(jnp.int32), scalar(jnp.int32))
      with self.context():
        self._programs[key] = jax.jit(fn).lower(*args).compile()
      self.compiles += 1
      logging.info("sampler: compiled program %d for batch %d, prompt length %d, %d new tokens%s",
                   self.compiles, batch, prompt_len, new,
                   f", top {top_k} log-probs" if top_k else "")
    return self._programs[key]

  def generate(self, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
               eos_ids: Sequence[int] = (), stop_ids: Sequence[Sequence[int]] = (),
               top_logprobs: int = 0) -> list[Generation]:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens` tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError("generate: every prompt needs at least one token")
    if len(eos_ids) > MAX_EOS or len(stop_ids) > MAX_STOP or any(
        not 0 < len(s) <= MAX_STOP_LEN for s in stop_ids):
      raise ValueError(f"generate: at most {MAX_EOS} EOS ids and {MAX_STOP} stop sequences of 1 to "
                       f"{MAX_STOP_LEN} tokens")
    if not 0 <= top_logprobs <= TOP_LOGPROBS:
      raise ValueError(f"generate: top_logprobs must be in 0..{TOP_LOGPROBS}")
    batch = bucket(len(prompts), max(self.batch_multiple, self.min_batch))
    batch = -(-batch // self.batch_multiple) * self.batch_multiple
    prompt_len = bucket(max(len(p) for p in prompts), self.min_prompt_len)
    new = bucket(max_new_tokens, self.min_new_tokens)
    tokens = np.zeros((batch, prompt_len), np.int32)
    segments = np.zeros((batch, prompt_len), np.int32)
    for row, prompt in enumerate(prompts):
      tokens[row, prompt_len - len(prompt):] = prompt
      segments[row, prompt_len - len(prompt):] = 1
    segments[len(prompts):, -1] = 1  # Filler rows: one token so every row is well defined.
    eos = np.full(MAX_EOS, -1, np.int32)
    eos[:len(eos_ids)] = list(eos_ids)
    stops = np.full((MAX_STOP, MAX_STOP_LEN), -1, np.int32)
    for i, s in enumerate(stop_ids):
      stops[i, MAX_STOP_LEN - len(s):] = list(s)
    k = TOP_LOGPROBS if top_logprobs else 0
    program = self._program(params, batch, prompt_len, new, k)
    out, logp, top_id, top_lp, length, stopped = map(hosts.to_host, program(
        params, tokens, segments, eos, stops, jax.random.PRNGKey(seed), np.float32(temperature),
        np.float32(top_p), np.int32(top_k), np.int32(max_new_tokens)))
    results = []
    for row in range(len(prompts)):
      n = int(length[row])
      top = [list(zip(top_id[row, i, :top_logprobs].tolist(), top_lp[row, i, :top_logprobs].tolist()))
             for i in range(n)] if top_logprobs else [[] for _ in range(n)]
      results.append(Generation(out[row, :n].tolist(), logp[row, :n].tolist(), top,
                                "stop" if stopped[row] else "length"))
    return results


_DEFAULT_SAMPLERS: dict[ModelConfig, Sampler] = {}


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], **kwargs) -> list[Generation]:
  """`Sampler.generate` with one shared single-device Sampler per config (compiles are reused)."""
  if cfg not in _DEFAULT_SAMPLERS:
    _DEFAULT_SAMPLERS[cfg] = Sampler(cfg)
  return _DEFAULT_SAMPLERS[cfg].generate(params, prompts, **kwargs)
