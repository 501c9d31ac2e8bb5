"""serve_teacher backend over one of our models: an HF directory or a checkpoint of ours.

The prompt goes through the tokenizer's chat template (with the generation prompt); the n choices
of a request are sampled together by the KV-cache sampler (proxykd/models/sampling.py), one request
at a time on the accelerator (JAX work runs in a worker thread so the server keeps accepting
connections). Token texts are prefix differences of the decoded ids, so they concatenate to the
response exactly; the end-of-turn token is not part of the response, as with OpenAI.
"""
from __future__ import annotations

import asyncio
import os
import random

from proxykd.errors import UserError
from proxykd.teacher.backend import Choice, Token, truncate

DEFAULT_MAX_TOKENS = 256


class ModelBackend:

  def __init__(self, params, cfg, tokenizer, model_name: str):
    self.params, self.cfg, self.tokenizer, self.model_name = params, cfg, tokenizer, model_name
    self.eos_ids = sorted({i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>"))
                           if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id})
    self._lock = asyncio.Lock()

  @classmethod
  def from_config(cls, config) -> "ModelBackend":
    from proxykd.models.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
    if bool(config.hf_dir) == bool(config.checkpoint):
      raise UserError("serve_teacher backend=model: set exactly one of hf_dir and checkpoint")
    if config.hf_dir:
      from proxykd.models import hf_io  # pylint: disable=import-outside-toplevel
      params, cfg = hf_io.load_hf(config.hf_dir)
      tok_dir, name = config.tokenizer or config.hf_dir, os.path.basename(os.path.normpath(config.hf_dir))
    else:
      from proxykd.models import checkpoint  # pylint: disable=import-outside-toplevel
      try:
        params, cfg, meta = checkpoint.restore_for_inference(config.checkpoint)
      except FileNotFoundError as e:
        raise UserError(f"serve_teacher: checkpoint: {e}") from None
      tok_dir, name = config.tokenizer or meta.get("tokenizer"), "proxykd-checkpoint"
      if not tok_dir:
        raise UserError("serve_teacher: the checkpoint records no tokenizer; set --config.tokenizer=DIR")
    try:
      tokenizer = load_tokenizer(tok_dir)
    except (FileNotFoundError, OSError) as e:
      raise UserError(f"serve_teacher: tokenizer {tok_dir}: {e}") from None
    if not getattr(tokenizer, "chat_template", None):
      raise UserError(f"serve_teacher: tokenizer {tok_dir} has no chat template")
    return cls(params, cfg, tokenizer, name)

  def _prompt_ids(self, messages: list[dict]) -> list[int]:
    msgs = [{"role": m["role"], "content": m.get("content") or ""} for m in messages]
    out = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

  def count_tokens(self, messages: list[dict]) -> int:
    return len(self._prompt_ids(messages))

  def _texts(self, ids: list[int]) -> list[str]:
    """Per-token texts whose concatenation is the decoded response."""
    out, prev = [], ""
    for i in range(len(ids)):
      cur = self.tokenizer.decode(ids[:i + 1], skip_special_tokens=True)
      out.append(cur[len(prev):] if cur.startswith(prev) else cur)
      prev = cur
    return out

  def _choice(self, gen, max_tokens: int | None, stop: list[str]) -> Choice:
    ids, lps, tops = gen.tokens, gen.logprobs, gen.top_logprobs
    if ids and ids[-1] in self.eos_ids:
      ids, lps, tops = ids[:-1], lps[:-1], tops[:-1]
    texts = self._texts(ids)
    tokens = [Token(t, float(lp), [(self.tokenizer.decode([j]), float(l)) for j, l in top])
              for t, lp, top in zip(texts, lps, tops)]
    return truncate(tokens, max_tokens, stop, finish=gen.finish_reason)

  async def complete(self, messages, *, n=1, temperature=1.0, top_p=1.0, max_tokens=None, seed=None,
                     stop=(), top_logprobs=0) -> list[Choice]:
    from proxykd.models import sampling  # pylint: disable=import-outside-toplevel
    prompt = self._prompt_ids(messages)
    room = self.cfg.max_position_embeddings - len(prompt)
    max_new = max(1, min(max_tokens or DEFAULT_MAX_TOKENS, room))
    seed = seed if seed is not None else random.randrange(2 ** 31)
    async with self._lock:
      gens = await asyncio.to_thread(
          sampling.generate, self.params, self.cfg, [prompt] * n, max_new_tokens=max_new,
          temperature=temperature, top_p=top_p, seed=seed, eos_ids=self.eos_ids, top_logprobs=top_logprobs)
    return [self._choice(g, max_tokens, list(stop)) for g in gens]
