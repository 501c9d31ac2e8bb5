"""serve_teacher over one of our models (HF dir / checkpoint) through the real `openai` client."""
import math

import jax
import openai
import pytest

from configs import serve_teacher as serve_config
from proxykd.models import hf_io, preset
from proxykd.models.transformer import init_params
from proxykd.errors import UserError
from proxykd.data import problems
from proxykd.teacher import server, serving
from proxykd.teacher.model_backend import ModelBackend
from proxykd.models import checkpoint


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
  from proxykd.models.tokenizer import build_demo_tokenizer  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("model")
  texts = [p.question for p in problems.generate(200, "train", seed=0)]
  build_demo_tokenizer(root / "tok", texts, vocab_size=512)
  cfg = preset("tiny")
  params = init_params(cfg, jax.random.PRNGKey(0))
  hf_io.export_hf(params, cfg, root / "hf", tokenizer_dir=root / "tok")
  checkpoint.save_checkpoint(root / "ckpt", 0, params, {"model": cfg.to_dict(), "tokenizer": str(root / "tok")})
  return root


def _config(**kw):
  c = serve_config.get_config("backend=model")
  c.update(**kw)
  return c


def test_model_backend_served_over_http(model_dirs):
  backend = ModelBackend.from_config(_config(hf_dir=str(model_dirs / "hf")))
  assert backend.model_name == "hf"
  msgs = [{"role": "user", "content": problems.generate(1, "heldout")[0].question}]
  with serving.BackgroundServer(server.create_app(backend)) as url:
    c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    r = c.chat.completions.create(model="hf", messages=msgs, n=2, max_tokens=6, seed=3, temperature=1.0,
                                  logprobs=True, top_logprobs=3)
    again = c.chat.completions.create(model="hf", messages=msgs, n=2, max_tokens=6, seed=3, temperature=1.0,
                                      logprobs=True, top_logprobs=3)  # Same shapes: no recompile.
    greedy = c.chat.completions.create(model="hf", messages=msgs, n=2, max_tokens=6, temperature=0.0, logprobs=True,
                                       top_logprobs=3)
  assert [x.message.content for x in again.choices] == [x.message.content for x in r.choices]
  assert r.usage.prompt_tokens == backend.count_tokens(msgs) > 10
  for ch in r.choices:
    toks = ch.logprobs.content
    assert "".join(t.token for t in toks) == ch.message.content
    assert ch.finish_reason in ("stop", "length") and len(toks) <= 6
    for t in toks:
      assert t.logprob <= 0 and len(t.top_logprobs) == 3
      assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
      assert sum(math.exp(u.logprob) for u in t.top_logprobs) <= 1 + 1e-5
  for t in greedy.choices[0].logprobs.content:  # Greedy: each token is the most likely one.
    assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)


def test_checkpoint_backend_and_config_errors(model_dirs):
  backend = ModelBackend.from_config(_config(checkpoint=str(model_dirs / "ckpt")))
  assert backend.count_tokens([{"role": "user", "content": "hi"}]) > 2
  with pytest.raises(UserError, match="exactly one"):
    ModelBackend.from_config(_config())
  with pytest.raises(UserError, match="checkpoint"):
    ModelBackend.from_config(_config(checkpoint=str(model_dirs / "missing")))
