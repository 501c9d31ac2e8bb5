"""Autoregressive sampling with a KV cache: greedy, temperature and nucleus (top-p).

Prompts are left-padded into one batch (pad slots get segment 0, so no real token attends to
them), prefilled in one forward, then decoded one token per step inside a `lax.while_loop` that
stops as soon as every row has produced an EOS. Everything after the prompt is one jitted program
per (batch, prompt length, max_new_tokens) bucket; buckets are rounded up to limit recompiles.
Log-probabilities are those of the model's untempered distribution (as OpenAI reports them).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from proxykd.models.config import ModelConfig
from proxykd.models.transformer import Transformer, init_cache, lm_head_kernel


@dataclasses.dataclass
class Generation:
  tokens: list[int]  # Generated ids, up to and including the EOS if one was produced.
  logprobs: list[float]  # log p(token) under the model, per generated token.
  top_logprobs: list[list[tuple[int, float]]]  # Per token, the k most likely (id, logprob).
  finish_reason: str  # "stop" (EOS) or "length".


def _round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def _pick(logits, rng, temperature, top_p):
  """Sample one id per row from float32 logits [B, V]."""
  if temperature <= 0.0:
    return jnp.argmax(logits, axis=-1)
  logits = logits / temperature
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # Always keeps the first.
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_p",
                                             "top_k_logprobs"))
def _generate(params, tokens, segments, eos_ids, rng, *, cfg: ModelConfig, max_new_tokens: int,
              temperature: float, top_p: float, top_k_logprobs: int):
  model = Transformer(cfg)
  batch, prompt_len = tokens.shape
  head = lm_head_kernel(params, cfg)
  positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
  cache = init_cache(cfg, batch, prompt_len + max_new_tokens)
  hidden, cache = model.apply({"params": params}, tokens, positions, segments, cache=cache,
                              return_hidden=True)
  k = max(top_k_logprobs, 1)

  def emit(hidden_last, state, step):
    logits = jnp.einsum("be,ev->bv", hidden_last, head.astype(hidden_last.dtype),
                        preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    token = _pick(logits, jax.random.fold_in(rng, step), temperature, top_p)
    token = jnp.where(state["done"], 0, token)
    top_lp, top_id = jax.lax.top_k(logp, k)
    state = dict(state)
    state["out"] = state["out"].at[:, step].set(token)
    state["logp"] = state["logp"].at[:, step].set(jnp.take_along_axis(logp, token[:, None], 1)[:, 0])
    state["top_id"] = state["top_id"].at[:, step].set(top_id)
    state["top_lp"] = state["top_lp"].at[:, step].set(top_lp)
    state["length"] = jnp.where(state["done"], state["length"], step + 1)
    state["done"] = state["done"] | jnp.isin(token, eos_ids)
    state["token"] = token
    return state

  state = {
      "out": jnp.zeros((batch, max_new_tokens), jnp.int32),
      "logp": jnp.zeros((batch, max_new_tokens), jnp.float32),
      "top_id": jnp.zeros((batch, max_new_tokens, k), jnp.int32),
      "top_lp": jnp.zeros((batch, max_new_tokens, k), jnp.float32),
      "length": jnp.zeros((batch,), jnp.int32), "done": jnp.zeros((batch,), bool),
      "token": jnp.zeros((batch,), jnp.int32), "cache": cache,
      "position": positions[:, -1] + 1, "step": jnp.ones((), jnp.int32),
  }
  state = emit(hidden[:, -1], state, 0)

  def cond(state):
    return (state["step"] < max_new_tokens) & ~jnp.all(state["done"])

  def body(state):
    hidden, cache = model.apply({"params": params}, state["token"][:, None],
                                state["position"][:, None], jnp.ones((batch, 1), jnp.int32),
                                cache=state["cache"], return_hidden=True)
    state = emit(hidden[:, 0], {**state, "cache": cache}, state["step"])
    return {**state, "position": state["position"] + 1, "step": state["step"] + 1}

  state = jax.lax.while_loop(cond, body, state)
  return state["out"], state["logp"], state["top_id"], state["top_lp"], state["length"], state["done"]


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_ids: Sequence[int] = (), top_logprobs: int = 0) -> list[Generation]:
  """Continue each prompt (a list of token ids) by up to `max_new_tokens` tokens."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate: every prompt needs at least one token")
  batch = _round_up(len(prompts), 8) if len(prompts) > 8 else len(prompts)
  prompt_len = _round_up(max(len(p) for p in prompts), 32)
  tokens = np.zeros((batch, prompt_len), np.int32)
  segments = np.zeros((batch, prompt_len), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, prompt_len - len(prompt):] = prompt
    segments[row, prompt_len - len(prompt):] = 1
  segments[len(prompts):, -1] = 1  # Filler rows: one token so every row is well defined.
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  out, logp, top_id, top_lp, length, done = jax.device_get(_generate(
      params, jnp.asarray(tokens), jnp.asarray(segments), eos, jax.random.PRNGKey(seed), cfg=cfg,
      max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
      top_k_logprobs=int(top_logprobs)))
  results = []
  for row in range(len(prompts)):
    n = int(length[row])
    top = [list(zip(top_id[row, i, :top_logprobs].tolist(), top_lp[row, i, :top_logprobs].tolist()))
           for i in range(n)] if top_logprobs else [[] for _ in range(n)]
    results.append(Generation(out[row, :n].tolist(), logp[row, :n].tolist(), top,
                              "stop" if done[row] else "length"))
  return results
