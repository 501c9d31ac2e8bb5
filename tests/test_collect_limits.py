"""Client-side limits: RPM/TPM token buckets, Retry-After parsing, backoff with jitter."""
import asyncio
import email.utils
import random
import time

import pytest

from proxykd.teacher import limits


def _timed(limiter, calls):
  async def go():
    t0 = time.monotonic()
    for tokens in calls:
      await limiter.acquire(tokens)
    return time.monotonic() - t0
  return asyncio.run(go())


def test_rpm_limit_spaces_requests():
  # 1200 rpm = 20/s with a one-second bucket: 20 go at once, the next 10 take 0.5 s.
  assert _timed(limits.RateLimiter(rpm=1200), [0] * 20) < 0.1
  assert 0.45 <= _timed(limits.RateLimiter(rpm=1200), [0] * 30) < 0.8


def test_tpm_limit_counts_tokens():
  # 60k tpm = 1000 tokens/s: 3000 tokens in 500-token requests need ~2 s beyond the first second's bucket.
  assert 1.9 <= _timed(limits.RateLimiter(tpm=60000), [500] * 6) < 2.4
  assert _timed(limits.RateLimiter(), [10 ** 6] * 100) < 0.1  # Unlimited.


def test_retry_after_headers():
  assert limits.retry_after({"retry-after-ms": "250"}) == pytest.approx(0.25)
  assert limits.retry_after({"retry-after": "3"}) == 3.0
  date = email.utils.formatdate(time.time() + 30, usegmt=True)
  assert 28 <= limits.retry_after({"retry-after": date}) <= 31
  assert limits.retry_after({}) is None and limits.retry_after({"retry-after": "soon"}) is None


def test_backoff_is_exponential_with_jitter_and_capped():
  p = limits.RetryPolicy(backoff_base_s=0.5, backoff_max_s=4.0)
  rng = random.Random(0)
  for attempt, full in ((0, 0.5), (1, 1.0), (2, 2.0), (5, 4.0)):
    waits = [p.backoff(attempt, rng) for _ in range(200)]
    assert full / 2 <= min(waits) and max(waits) <= full and max(waits) - min(waits) > full / 4


def _err(cls, status, headers=None, message="server says no"):
  import httpx2  # pylint: disable=import-outside-toplevel  (the transport the openai client uses)
  req = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")
  return cls(message, response=httpx2.Response(status, headers=headers or {}, request=req),
             body={"message": message})


def _run_calls(errors, policy):
  import openai  # pylint: disable=import-outside-toplevel
  calls = []

  async def fn():
    calls.append(time.monotonic())
    if len(calls) <= len(errors):
      e = errors[len(calls) - 1]
      if isinstance(e, str):  # A dropped connection (openai needs the request it was making).
        import httpx2  # pylint: disable=import-outside-toplevel
        e = openai.APIConnectionError(request=httpx2.Request("POST", "http://127.0.0.1/v1/x"))
      raise e
    return "ok"

  stats = limits.CallStats()
  out = asyncio.run(limits.call_with_retries(fn, policy, random.Random(0), stats))
  return out, calls, stats


def test_retries_honour_retry_after_and_stop_on_permanent_errors():
  import openai  # pylint: disable=import-outside-toplevel
  slow = limits.RetryPolicy(backoff_base_s=10.0)  # Backoff would take >= 5 s: only Retry-After is quick.
  out, calls, stats = _run_calls([_err(openai.RateLimitError, 429, {"retry-after-ms": "300"})], slow)
  assert out == "ok" and 0.29 <= calls[1] - calls[0] < 1.0 and stats.errors == {"429": 1}
  fast = limits.RetryPolicy(backoff_base_s=0.01, max_retries=3)
  out, calls, stats = _run_calls([_err(openai.InternalServerError, 503), "drop"], fast)
  assert out == "ok" and len(calls) == 3 and stats.errors == {"503": 1, "APIConnectionError": 1}
  out, calls, _ = _run_calls([_err(openai.BadRequestError, 400, message="prompt too long")], fast)
  assert isinstance(out, limits.Failure) and len(calls) == 1
  assert (out.status_code, out.message) == (400, "prompt too long")
  out, calls, _ = _run_calls([_err(openai.InternalServerError, 500)] * 10, fast)
  assert isinstance(out, limits.Failure) and len(calls) == 4 and out.message.startswith("gave up after 4")
  with pytest.raises(limits.FatalAPIError, match="401"):
    _run_calls([_err(openai.AuthenticationError, 401)], fast)
