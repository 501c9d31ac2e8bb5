"""Tokenizers: load an HF tokenizer directory (with its chat template), or build a small one.

`build_demo_tokenizer` trains a byte-level BPE with `tokenizers` on local text and saves it as an
HF tokenizer directory with a Llama-3-style chat template, so the demo and the tests need no
download. Proxy and student must share one tokenizer: `check_same_tokenizer` refuses otherwise.
"""
from __future__ import annotations

import os
from typing import Iterable

from etils import epath

from proxykd import paths

# Llama-3-style chat template; the response is whatever follows the generation prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SPECIAL_TOKENS = ("<|pad|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                  "<|end_header_id|>")


# What a remote tokenizer directory (or the HF model directory it is part of) is copied for: the
# tokenizer files of every family, never the weights.
_TOKENIZER_FILES = ("*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken")


def load_tokenizer(directory: epath.PathLike):
  """`AutoTokenizer` from a directory; never touches the network beyond `directory` itself. A
  directory that is not local (gs://...) is copied to a temporary local one first (transformers
  reads only local files), which is removed once the tokenizer is loaded."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  if not epath.Path(directory).is_dir():
    raise FileNotFoundError(f"tokenizer directory {os.fspath(directory)} does not exist")
  with paths.local_dir(directory, _TOKENIZER_FILES, prefix="proxykd-tokenizer-") as local:
    return AutoTokenizer.from_pretrained(local, local_files_only=True)


def build_demo_tokenizer(out_dir: epath.PathLike, texts: Iterable[str], vocab_size: int = 512):
  """Train a byte-level BPE on `texts` and save it (with chat template) as an HF tokenizer dir."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
      pad_token="<|pad|>", chat_template=CHAT_TEMPLATE)
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(out_dir)
  return load_tokenizer(out_dir)


def check_same_tokenizer(a, b, name_a: str = "proxy", name_b: str = "student") -> None:
  """Token-level KL needs one vocabulary: refuse two tokenizers that disagree."""
  va, vb = a.get_vocab(), b.get_vocab()
  if va != vb:
    only_a = sorted(set(va) - set(vb))[:5]
    only_b = sorted(set(vb) - set(va))[:5]
    moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])[:5]
    raise ValueError(
        f"the {name_a} and {name_b} tokenizers differ (sizes {len(va)} vs {len(vb)}; only in "
        f"{name_a}: {only_a}; only in {name_b}: {only_b}; different ids: {moved}); token-level "
        "distillation needs one shared tokenizer")


def fingerprint(tokenizer) -> str:
  """A short hash of everything that decides token ids: the vocabulary and merges, normaliser and
  pre-tokeniser (tokenizer.json), the chat template and the special tokens. Artefacts made under
  one tokenizer (packed rows, the corpus prior, a proxy cache) record it and are refused under
  another."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  backend = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else \
      json.dumps(sorted(tokenizer.get_vocab().items()))
  blob = json.dumps({"backend": backend, "chat_template": tokenizer.chat_template,
                     "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}},
                    sort_keys=True)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# Tokens that end an assistant turn in the chat templates of the supported families.
_END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|end_of_text|>", "</s>")


def end_of_turn_ids(tokenizer) -> list[int]:
  """The ids that end a generated turn: the EOS and the chat templates' end-of-turn tokens."""
  vocab = tokenizer.get_vocab()
  ids = {tokenizer.eos_token_id} | {vocab[t] for t in _END_OF_TURN if t in vocab}
  return sorted(i for i in ids if i is not None)
