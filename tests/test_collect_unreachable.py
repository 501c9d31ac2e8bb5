"""An endpoint that never answers stops `collect` within seconds, naming the URL; later drops are retried."""
import asyncio
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import openai
import pytest

from configs import collect as collect_config
from proxykd.data import corpus
from proxykd.errors import UserError
from proxykd.stages import collect
from proxykd.teacher import limits, serving

REPO = Path(__file__).resolve().parents[1]


def _connect_error():
  e = openai.APIConnectionError(request=httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions"))
  e.__cause__ = httpx2.ConnectError("All connection attempts failed")
  e.__cause__.__context__ = ConnectionRefusedError(111, "Connect call failed")
  return e


class Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def _calls(reach, clock, errors):
  """call_with_retries over `fn` raising `errors` in turn (then "ok"); each call advances the clock 1 s."""
  n = [0]

  async def fn():
    clock.t += 1.0
    n[0] += 1
    if n[0] <= len(errors):
      raise errors[n[0] - 1]
    return "ok"

  policy = limits.RetryPolicy(max_retries=2, backoff_base_s=0.001, backoff_max_s=0.001)
  return asyncio.run(limits.call_with_retries(fn, policy, random.Random(0), limits.CallStats(), reach)), n[0]


def test_connect_failures_before_any_answer_ignore_the_budget_then_stop_after_the_grace():
  clock = Clock()
  reach = limits.Reachability("http://127.0.0.1:9/v1", grace_s=5.0, clock=clock)
  # 3 refusals then success: more than max_retries=2, yet retried (the server may be starting).
  assert _calls(reach, clock, [_connect_error()] * 3) == ("ok", 4)
  clock = Clock()
  reach = limits.Reachability("http://127.0.0.1:9/v1", grace_s=5.0, clock=clock)
  with pytest.raises(UserError, match=r"cannot reach the teacher at http://127\.0\.0\.1:9/v1: ConnectError: "
                     r".*Connect call failed"):
    _calls(reach, clock, [_connect_error()] * 20)
  assert 5.0 <= clock.t < 7.0


def test_once_an_answer_came_connection_errors_follow_the_retry_budget():
  clock = Clock()
  reach = limits.Reachability("http://127.0.0.1:9/v1", grace_s=5.0, clock=clock)
  reach.reached = True
  out, calls = _calls(reach, clock, [_connect_error()] * 20)
  assert isinstance(out, limits.Failure) and calls == 3 and out.message.startswith("gave up after 3 attempts")


def _dead_url():
  sock = serving.bind()
  url = serving.base_url(sock)
  sock.close()  # Nothing listens there: every connection is refused.
  return url


def test_collect_against_a_dead_port_stops_quickly_naming_the_url(tmp_path, monkeypatch):
  monkeypatch.setenv("PROXYKD_TEST_KEY", "sk-unreachable-test")
  url = _dead_url()
  c = collect_config.get_config()
  c.progress = False
  c.prompts.num = 200
  c.teacher.update(base_url=url, api_key_env="PROXYKD_TEST_KEY")
  t0 = time.monotonic()
  with pytest.raises(UserError, match=f"cannot reach the teacher at {url}"):
    collect.run(c, str(tmp_path))
  assert time.monotonic() - t0 < 30
  failed = tmp_path / "collect" / corpus.FAILED_FILENAME
  assert not failed.exists() or failed.read_text() == ""  # Not a failed.jsonl line per prompt.


def test_cli_against_a_dead_port_prints_one_clear_line(tmp_path):
  url = _dead_url()
  env = dict(os.environ, PROXYKD_UNREACHABLE_KEY="sk-unreachable-cli", JAX_PLATFORMS="cpu")
  t0 = time.monotonic()
  proc = subprocess.run([sys.executable, str(REPO / "main.py"), f"--config={REPO / 'configs' / 'collect.py'}",
                         f"--workdir={tmp_path}", f"--config.teacher.base_url={url}",
                         "--config.teacher.api_key_env=PROXYKD_UNREACHABLE_KEY", "--config.prompts.num=50"],
                        env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
  assert time.monotonic() - t0 < 30
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f"error: cannot reach the teacher at {url}: ConnectError" in proc.stderr
  assert "Traceback" not in proc.stderr and "sk-unreachable-cli" not in proc.stderr + proc.stdout
