"""serve_teacher's app through the real `openai` client on loopback."""
import asyncio
import time

import openai
import pytest

from proxykd.data import problems
from proxykd.teacher import server, serving, synthetic

MODEL = synthetic.MODEL_NAME
KEY = "sk-test-server-key"


def serve(**kw):
  return serving.BackgroundServer(server.create_app(synthetic.SyntheticBackend(), **kw))


@pytest.fixture(scope="module")
def client():
  with serve(api_key=KEY, max_context=400) as url:
    yield openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)


def msgs(q):
  return [{"role": "system", "content": "Solve it."}, {"role": "user", "content": q}]


def test_models_and_completion_schema(client):
  assert [m.id for m in client.models.list().data] == [MODEL]
  p = problems.generate(1, "train", seed=2)[0]
  r = client.chat.completions.create(model=MODEL, messages=msgs(p.question), n=3, seed=7, temperature=1.0,
                                     logprobs=True, top_logprobs=4)
  assert [c.index for c in r.choices] == [0, 1, 2]
  for c in r.choices:
    assert c.message.content.endswith(f"#### {p.answer}") and c.finish_reason == "stop"
    assert "".join(t.token for t in c.logprobs.content) == c.message.content
    assert all(1 <= len(t.top_logprobs) <= 4 for t in c.logprobs.content)
  assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
  assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
  again = client.chat.completions.create(model=MODEL, messages=msgs(p.question), n=3, seed=7, temperature=1.0)
  assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
  assert again.choices[0].logprobs is None


def test_stop_and_max_tokens(client):
  q = problems.generate(1, "train", seed=3)[0].question
  r = client.chat.completions.create(model=MODEL, messages=msgs(q), max_tokens=5)
  assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
  r = client.chat.completions.create(model=MODEL, messages=msgs(q), stop=["####"])
  assert "####" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"


def test_errors_in_openai_schema(client):
  q = problems.generate(1, "train", seed=3)[0].question
  with pytest.raises(openai.NotFoundError, match="does not exist"):
    client.chat.completions.create(model="gpt-x", messages=msgs(q))
  with pytest.raises(openai.BadRequestError, match="maximum context length") as e:
    client.chat.completions.create(model=MODEL, messages=msgs(q * 20))
  assert e.value.code == "context_length_exceeded"
  with pytest.raises(openai.BadRequestError, match="temperature"):
    client.chat.completions.create(model=MODEL, messages=msgs(q), temperature=3)
  with pytest.raises(openai.BadRequestError, match="logprobs"):
    client.chat.completions.create(model=MODEL, messages=msgs(q), top_logprobs=2)


def test_bearer_token_required(client):
  bad = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
  with pytest.raises(openai.AuthenticationError):
    bad.models.list()


def test_fault_injection_errors_and_drops():
  q = problems.generate(1, "train", seed=3)[0].question
  with serve(faults=server.Faults(error_rate=1.0, seed=1)) as url:
    c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    seen = set()
    for _ in range(12):
      with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model=MODEL, messages=msgs(q))
      seen.add(e.value.status_code)
      if e.value.status_code == 429:
        assert e.value.response.headers["retry-after-ms"] == "50"
    assert seen == {429, 500}
  with serve(faults=server.Faults(drop_rate=1.0)) as url:
    c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    with pytest.raises(openai.APIConnectionError):
      c.chat.completions.create(model=MODEL, messages=msgs(q))


def test_added_latency_overlaps_across_concurrent_requests():
  q = problems.generate(1, "train", seed=3)[0].question
  with serve(faults=server.Faults(latency_s=0.4)) as url:
    async def go():
      c = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)
      t0 = time.monotonic()
      rs = await asyncio.gather(*[c.chat.completions.create(model=MODEL, messages=msgs(q)) for _ in range(32)])
      await c.close()
      return time.monotonic() - t0, rs
    elapsed, rs = asyncio.run(go())
  assert len(rs) == 32 and 0.4 <= elapsed < 1.5
