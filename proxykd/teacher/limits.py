"""Client-side limits for API calls: requests/tokens per minute, and retries with backoff.

Retried: 408, 409, 429 and 5xx responses, timeouts and dropped connections, waiting the server's
retry-after-ms / retry-after when it sends one, else exponential backoff with jitter. Refused for
good: every other 4xx, returned as a `Failure` with the server's message. 401/403 (a bad key) and
404 (unknown model or route) would fail every request alike, so they stop the run (`FatalAPIError`),
as does a 429 whose code is `insufficient_quota` (billing, not load). An endpoint that never
answered (refused connection, unknown host, connect timeout) stops the run after a short grace
(`Reachability`) instead of being retried request after request.
"""
from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import openai

from proxykd.errors import UserError

try:  # The HTTP library of the installed openai client: httpx2 from openai 3, httpx before.
  import httpx2 as httpx
except ImportError:  # pragma: no cover
  import httpx

RETRYABLE_STATUS = (408, 409, 429)
FATAL_STATUS = (401, 403, 404)


class FatalAPIError(UserError):
  """The endpoint refuses every request (bad key, unknown model, wrong URL)."""


@dataclasses.dataclass
class Failure:
  status_code: int | None
  type: str
  message: str

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


class RateLimiter:
  """Token buckets for requests and tokens per minute (0 = unlimited), each holding one second's worth."""

  def __init__(self, rpm: float = 0, tpm: float = 0, clock: Callable[[], float] = time.monotonic):
    self.rates = (rpm / 60.0, tpm / 60.0)
    self.caps = (max(1.0, rpm / 60.0), max(1.0, tpm / 60.0))
    self.level = list(self.caps)
    self.clock = clock
    self.last = clock()
    self.lock = asyncio.Lock()

  def _refill(self) -> None:
    now = self.clock()
    dt, self.last = now - self.last, now
    self.level = [min(c, lv + r * dt) for lv, r, c in zip(self.level, self.rates, self.caps)]

  async def acquire(self, tokens: int = 0) -> None:
    """Wait until one request of `tokens` tokens fits both limits, then take it."""
    need = (1.0, float(tokens))
    async with self.lock:  # First come, first served.
      while True:
        self._refill()
        # A request bigger than a bucket waits for a full bucket, then goes (and drives it negative).
        wait = max((min(n, c) - lv) / r if r > 0 and lv < min(n, c) else 0.0
                   for n, lv, r, c in zip(need, self.level, self.rates, self.caps))
        if wait <= 0:
          self.level = [lv - n if r > 0 else lv for n, lv, r in zip(need, self.level, self.rates)]
          return
        await asyncio.sleep(wait)


@dataclasses.dataclass
class RetryPolicy:
  max_retries: int = 8
  backoff_base_s: float = 0.5
  backoff_max_s: float = 30.0
  retry_after_max_s: float = 120.0

  def backoff(self, attempt: int, rng: random.Random) -> float:
    """Exponential backoff with 'equal jitter': uniform in [d/2, d], d = base * 2^attempt (capped)."""
    d = min(self.backoff_max_s, self.backoff_base_s * (2 ** attempt))
    return d * (0.5 + 0.5 * rng.random())


def retry_after(headers: Any) -> float | None:
  """Seconds the server asked us to wait (retry-after-ms, retry-after seconds or HTTP date), if any."""
  if headers is None:
    return None
  for key, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
    value = headers.get(key)
    if value is None:
      continue
    try:
      return max(0.0, float(value) * scale)
    except ValueError:
      parsed = email.utils.parsedate_tz(value)
      if parsed is not None:
        return max(0.0, email.utils.mktime_tz(parsed) - time.time())
  return None


def server_message(e: openai.APIStatusError) -> str:
  body = e.body
  if isinstance(body, dict) and isinstance(body.get("message"), str):
    return body["message"]
  return str(body) if body else e.message


def classify(e: Exception) -> tuple[bool, float | None, Failure]:
  """(retryable, server-requested wait, failure description) for an exception of the openai client."""
  if isinstance(e, openai.APIStatusError):
    status = e.status_code
    failure = Failure(status, type(e).__name__, server_message(e))
    if status in FATAL_STATUS or getattr(e, "code", None) == "insufficient_quota":  # (a 429 that never clears)
      raise FatalAPIError(f"the teacher endpoint answered {status} ({type(e).__name__}): {failure.message} "
                          "— check teacher.base_url, teacher.model and the key in the variable named by "
                          "teacher.api_key_env") from None
    return status in RETRYABLE_STATUS or status >= 500, retry_after(e.response.headers), failure
  if isinstance(e, (openai.APIConnectionError, openai.APITimeoutError)):  # timeouts, dropped connections
    return True, None, Failure(None, type(e).__name__, str(e) or "connection error")
  raise e


class Reachability:
  """Fail fast on an endpoint that has never answered.

  Until some call got an HTTP response (any status), a failure to connect (connection refused,
  unknown host, connect timeout) is retried whatever the retry budget, with short waits, for
  `grace_s` seconds from the first call; the next such failure raises UserError naming `url` and
  the cause. Once anything answered, connection errors are retried per RetryPolicy like any other
  transient error (a dropped connection mid-run is not a dead endpoint).
  """

  def __init__(self, url: str, grace_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
    self.url, self.grace_s, self.clock = url, grace_s, clock
    self.reached = False
    self.start: float | None = None

  def started(self) -> None:
    if self.start is None:
      self.start = self.clock()

  def unreached(self, e: Exception) -> bool:
    """True if `e` is a failure to connect to an endpoint that never answered (retry it regardless
    of the budget); raises UserError once the grace period is over."""
    cause = e.__cause__
    if self.reached or not isinstance(cause, (httpx.ConnectError, httpx.ConnectTimeout)):
      return False
    self.started()
    elapsed = self.clock() - self.start
    if elapsed >= self.grace_s:
      root = cause  # The most specific reason: e.g. "[Errno 111] Connect call failed" under "All attempts failed".
      while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
      raise UserError(f"cannot reach the teacher at {self.url}: {type(cause).__name__}: {root or cause or 'no detail'} "
                      f"(no answer to any request in {elapsed:.0f} s); check teacher.base_url and that the "
                      "server is up")
    return True


@dataclasses.dataclass
class CallStats:
  retries: int = 0
  errors: dict = dataclasses.field(default_factory=dict)  # "429" / "APIConnectionError" -> count


async def call_with_retries(fn: Callable[[], Awaitable[Any]], policy: RetryPolicy, rng: random.Random,
                            stats: CallStats | None = None, reach: Reachability | None = None) -> Any:
  """`await fn()`, retried per `policy`: its result, or a `Failure` once retrying is pointless. Raises
  only FatalAPIError (every request would fail alike) and, with `reach`, UserError for an endpoint
  that never answered."""
  attempt = 0
  while True:
    if reach is not None:
      reach.started()
    try:
      out = await fn()
      if reach is not None:
        reach.reached = True
      return out
    except (openai.APIStatusError, openai.APIConnectionError) as e:
      unreached = False
      if reach is not None:
        if isinstance(e, openai.APIStatusError):
          reach.reached = True
        else:
          unreached = reach.unreached(e)
      retryable, wait, failure = classify(e)
      if stats is not None:
        key = str(failure.status_code) if failure.status_code else failure.type
        stats.errors[key] = stats.errors.get(key, 0) + 1
      if not unreached and (not retryable or attempt >= policy.max_retries):
        if retryable:
          failure.message = f"gave up after {attempt + 1} attempts: {failure.message}"
        return failure
      delay = policy.backoff(attempt, rng) if wait is None else min(wait, policy.retry_after_max_s)
      if unreached:  # Keep knocking at short intervals until the endpoint answers or the grace is over.
        delay = min(delay, 1.0)
      attempt += 1
      if stats is not None:
        stats.retries += 1
      await asyncio.sleep(delay)
