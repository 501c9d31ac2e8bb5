"""Multiple choice by log-likelihood: the right answer picked where only the log-likelihood tells,
and each choice's score equal to the model's own forward over the whole conversation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxykd.data import tokenize
from proxykd.eval import choice, loglik
from proxykd.models.config import preset
from proxykd.models.tokenizer import load_tokenizer
from proxykd.models.transformer import Transformer, init_params, lm_head_kernel
from proxykd.train import scoring
from proxykd.train import sharding as shd

CFG = preset("tiny", vocab_size=384)
SEQ_LEN = 128


def bigram_params(tokenizer, chains: list[str], strength: float = 8.0):
  """A tiny model that is a planted bigram model: attention and MLP outputs are zero, so the last
  hidden state is the current token's embedding, and the head gives `strength` to each planted
  transition a -> b (consecutive characters of the `chains`) and 0 to everything else."""
  params = init_params(CFG, jax.random.PRNGKey(0))
  params = jax.tree.map(lambda x: np.array(x, copy=True), params)
  params["layers"]["attn"]["o"]["kernel"][:] = 0
  params["layers"]["mlp"]["down"]["kernel"][:] = 0
  params["final_norm"]["scale"][:] = 1
  emb = params["embedding"]
  normed = emb / np.sqrt(np.mean(emb ** 2, axis=-1, keepdims=True) + CFG.rms_norm_eps)
  head = np.zeros_like(params["lm_head"])
  ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
  for chain in chains:
    t = ids(chain)
    assert len(t) == len(chain), "every character must be one token"
    for a, b in zip(t, t[1:]):
      head[:, b] += strength * normed[a] / np.sum(normed[a] ** 2)
  params["lm_head"] = head
  return jax.tree.map(jnp.asarray, params)


@pytest.fixture(scope="module")
def scorer():
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  return scoring.Scorer(CFG, mesh, 4, SEQ_LEN, 32)


def test_the_planted_answer_wins_where_only_the_likelihood_tells(demo_tokenizer_dir, scorer):
  tokenizer = load_tokenizer(demo_tokenizer_dir)
  # Same characters, same length in tokens and bytes, same first letters among them: only the
  # transitions q->x and x->z, planted in the model, make "qxz" likelier than its anagrams.
  params = bigram_params(tokenizer, ["qxz"])
  questions = [
      choice.Question("1", "Which word?", ["zxq", "qxz", "xqz", "qzx"], list("ABCD"), 1),
      choice.Question("2", "Which word?", ["qzx", "xqz", "qxz"], list("ABC"), 2),
      choice.Question("3", "Which word?", ["qxz", "zxq"], list("AB"), 0),
  ]
  scored = loglik.response_logprobs(choice.choice_records(questions), tokenizer,
                                    lambda rows: scorer(params, rows), seq_len=SEQ_LEN)
  rows = choice.predictions(questions, scored)
  assert [r["prediction/accuracy"] for r in rows] == ["B", "C", "A"]
  assert choice.summarize(rows) == {"accuracy": 1.0, "accuracy_per_token": 1.0,
                                    "accuracy_per_byte": 1.0, "total": 3}
  gold = rows[0]["logprobs"][1]
  assert all(gold > lp + 10 for j, lp in enumerate(rows[0]["logprobs"]) if j != 1)
  # Where lengths differ, the rules disagree as they should: "q" (one token, one planted-free
  # step) beats "qxzq" (four tokens, two planted steps) by the sum, and loses per token and per byte.
  q = [choice.Question("4", "Which word?", ["q", "qxzj"], ["A", "B"], 1)]
  r = choice.predictions(q, loglik.response_logprobs(choice.choice_records(q), tokenizer,
                                                     lambda rows: scorer(params, rows), seq_len=SEQ_LEN))[0]
  assert r["tokens"] == [1, 4]
  assert r["prediction/accuracy"] == "A" and r["prediction/accuracy_per_token"] == "B"
  assert r["prediction/accuracy_per_byte"] == "B"


def test_choice_scores_equal_the_models_forward_over_the_conversation(demo_tokenizer_dir, scorer):
  tokenizer = load_tokenizer(demo_tokenizer_dir)
  params = init_params(CFG, jax.random.PRNGKey(3))
  qs = [choice.Question("1", "Tom has 3 apples. How many?", ["3 apples", "three", "7"], list("ABC"), 0)]
  records = choice.choice_records(qs, system_prompt="Answer briefly.")
  scored = loglik.response_logprobs(records, tokenizer, lambda rows: scorer(params, rows), seq_len=SEQ_LEN)
  model = Transformer(CFG)

  @jax.jit
  def forward(ids):  # one unpacked sequence, positions from 0
    hidden = model.apply({"params": params}, ids, jnp.arange(ids.shape[1])[None], jnp.ones_like(ids),
                         return_hidden=True)
    return jax.nn.log_softmax(hidden[0] @ lm_head_kernel(params, CFG), axis=-1)

  for rec, s in zip(records, scored):
    (ex,), _ = tokenize.tokenize([{**rec, "id": "x"}], tokenizer)
    logp = forward(jnp.asarray(ex.ids[None]))
    pos = np.nonzero(ex.loss_mask)[0]  # response tokens: no end-of-turn after a choice
    want = logp[pos - 1, ex.ids[pos]]
    assert s.token_ids == ex.ids[pos].tolist() and s.cut_prompt == 0
    np.testing.assert_allclose(s.logprobs, want, atol=2e-5)
    assert "".join(s.tokens) == rec["response"]
  with pytest.raises(Exception, match="no token left"):
    choice.predictions(qs, [scored[0], None, scored[2]])
