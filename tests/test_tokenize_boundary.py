"""Tokenise once, mask exactly: a SentencePiece-style (Metaspace) tokenizer built locally,
where tokenising prompt and response apart would change the ids at the boundary; and responses
the teacher did not finish (finish_reason="length") get no end-of-turn token."""
import numpy as np
import pytest

import sft_fixtures
from proxykd.data import tokenize
from proxykd.models.tokenizer import load_tokenizer

# Mistral-7B-Instruct-v0.1's template (Llama-2's without the space before the answer).
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def records():
  return sft_fixtures.synthetic_records(40, seed=1)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(records, tmp_path_factory):
  """A SentencePiece-style BPE (byte fallback; '▁' marks a word start and is prepended to the
  text: a Metaspace pre-tokeniser, as transformers loads Llama-2's and Mistral's tokenizers) with
  Mistral's chat template, saved and loaded back as a Llama tokenizer directory."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import AutoTokenizer, LlamaTokenizerFast
  tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
  tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
  texts = ([m["content"] for r in records for m in r["messages"]] + [r["response"] for r in records]
           + ["[INST] [/INST]"])
  tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                                     special_tokens=["<unk>", "<s>", "</s>"]))
  fast = LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>", chat_template=MISTRAL_TEMPLATE)
  out = tmp_path_factory.mktemp("sentencepiece_tok")
  fast.save_pretrained(out)
  return AutoTokenizer.from_pretrained(out, local_files_only=True)


def _prompt_text(tokenizer, record):
  return tokenizer.apply_chat_template(record["messages"], tokenize=False, add_generation_prompt=True)


def test_sentencepiece_boundary_is_tokenised_as_the_whole_chat(records, sentencepiece_tokenizer):
  tok = sentencepiece_tokenizer
  examples, stats = tokenize.tokenize(records, tok)
  differs = 0
  for rec, ex in zip(records, examples):
    prompt = _prompt_text(tok, rec)
    full = tok.apply_chat_template(rec["messages"] + [{"role": "assistant", "content": rec["response"]}],
                                   tokenize=False)
    whole = tok(full, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(ex.ids, whole)  # The ids the model sees reading the chat.
    apart = (tok(prompt, add_special_tokens=False)["input_ids"]
             + tok(full[len(prompt):], add_special_tokens=False)["input_ids"])
    differs += apart != whole
    # Apart, the response's first word gets a word-start '▁' it does not have after "[/INST]".
    assert (apart != whole) == (not rec["response"][0].isspace())
    n_prompt = int(np.argmax(ex.loss_mask))
    assert not ex.loss_mask[:n_prompt].any() and ex.loss_mask[n_prompt:].all()
    assert list(ex.ids[:n_prompt]) == tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(ex.ids[n_prompt:]) == (rec["response"] + "</s>").lstrip()  # (a first "▁" decodes to nothing)
    assert ex.ids[-1] == tok.eos_token_id
  assert differs >= len(records) // 2  # Tokenising apart would have trained on other ids.
  assert stats.boundary_merged == 0


def test_unfinished_responses_get_no_end_of_turn_token(records, demo_tokenizer_dir):
  tok = load_tokenizer(demo_tokenizer_dir)
  recs = [dict(r, finish_reason="length") if i % 2 else r for i, r in enumerate(records[:6])]
  eot = tok.convert_tokens_to_ids("<|eot_id|>")
  examples, stats = tokenize.tokenize(recs, tok)  # default: no_eos
  assert stats.unfinished == 3 and stats.unfinished_dropped == 0
  for rec, ex in zip(recs, examples):
    finished = rec["finish_reason"] != "length"
    assert (ex.ids[-1] == eot) == finished
    n_prompt = int(np.argmax(ex.loss_mask))
    assert tok.decode(ex.ids[n_prompt:]) == rec["response"] + ("<|eot_id|>" if finished else "")
  kept, stats = tokenize.tokenize(recs, tok, "drop")
  assert len(kept) == 3 and stats.unfinished_dropped == 3 and stats.total == 6
  kept, stats = tokenize.tokenize(recs, tok, "keep")
  assert all(ex.ids[-1] == eot for ex in kept) and stats.unfinished == 0
  with pytest.raises(ValueError, match="config.data.length_policy='cut'"):
    tokenize.tokenize(recs, tok, "cut")
