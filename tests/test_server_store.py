"""serve_teacher's bounds: no key off loopback, upload size (413), stored files and batches; batch listing."""
import asyncio
import io
import threading
import time

import httpx2
import openai
import pytest

from configs import serve_teacher as serve_config
from proxykd.errors import UserError
from proxykd.stages import serve_teacher
from proxykd.teacher import server, serving, synthetic

MODEL = synthetic.MODEL_NAME


class GatedBackend(synthetic.SyntheticBackend):
  """The synthetic teacher, holding every completion until `gate` is set (batches stay in progress)."""

  def __init__(self):
    self.gate = threading.Event()

  async def complete(self, messages, **kw):
    while not self.gate.is_set():
      await asyncio.sleep(0.01)
    return await super().complete(messages, **kw)


def _batch_input(k=0):
  line = ('{"custom_id": "r%d", "method": "POST", "url": "/v1/chat/completions", '
          '"body": {"model": "%s", "messages": [{"role": "user", "content": "2 + 2?"}]}}\n' % (k, MODEL))
  return io.BytesIO(line.encode())


def _wait(client, batch_id, status="completed"):
  for _ in range(500):
    if client.batches.retrieve(batch_id).status == status:
      return
    time.sleep(0.01)
  raise AssertionError(f"batch {batch_id} never reached {status}")


@pytest.mark.parametrize("host", ["0.0.0.0", "", "192.0.2.7", "::"])
def test_no_key_off_loopback_is_refused_before_binding(host, monkeypatch):
  monkeypatch.setattr(serving, "bind", lambda *a: pytest.fail("bound a socket"))
  monkeypatch.setattr(serve_teacher, "make_backend", lambda c: pytest.fail("built a backend"))
  c = serve_config.get_config()
  c.host = host
  with pytest.raises(UserError, match=f"host={host!r} is not a loopback address.*api_key_env"):
    serve_teacher.run(c, "/nonexistent")


def test_loopback_hosts_need_no_key_and_others_pass_with_one(monkeypatch):
  assert all(serve_teacher.is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
  assert not any(serve_teacher.is_loopback(h) for h in ("", "0.0.0.0", "::", "192.0.2.7"))
  c = serve_config.get_config()
  c.host, c.api_key_env = "0.0.0.0", "PROXYKD_SERVE_KEY"
  serve_teacher.check_exposure(c)  # A key is required by the server: allowed.
  monkeypatch.delenv("PROXYKD_SERVE_KEY", raising=False)
  monkeypatch.setattr(serving, "bind", lambda *a: pytest.fail("bound a socket"))
  with pytest.raises(UserError, match="PROXYKD_SERVE_KEY.*empty"):
    serve_teacher.run(c, "/nonexistent")


def test_uploads_over_the_limit_get_413_in_openai_format():
  app = server.create_app(synthetic.SyntheticBackend(), max_upload_bytes=1000)
  with serving.BackgroundServer(app) as url:
    c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    assert c.files.create(file=("ok.jsonl", io.BytesIO(b"x" * 1000)), purpose="batch").bytes == 1000
    for size in (1001, 50_000_000):  # Just over (seen after parsing); far over (refused from Content-Length).
      with pytest.raises(openai.APIStatusError) as e:
        c.files.create(file=("big.jsonl", io.BytesIO(b"x" * size)), purpose="batch")
      assert e.value.status_code == 413
      assert e.value.body == {"message": "The file is larger than this server's upload limit of 1000 bytes "
                              "(max_upload_mb).", "type": "invalid_request_error", "param": "file",
                              "code": "file_too_large"}
    # No Content-Length (chunked): refused while it streams in, long before the end of the body.
    sent = [0]

    def body():
      yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n'
      for _ in range(1000):  # 64 MB if read to the end
        sent[0] += 65536
        yield b"y" * 65536

    r = httpx2.post(url + "/files", content=body(), headers={"content-type": "multipart/form-data; boundary=b"},
                    timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    assert sent[0] < 32 * 2 ** 20


def test_stored_files_and_batches_are_bounded():
  backend = GatedBackend()
  app = server.create_app(backend, max_files=2, max_batches=2)
  with serving.BackgroundServer(app) as url:
    c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    early = c.files.create(file=("a.jsonl", _batch_input()), purpose="batch")
    ins = [c.files.create(file=(f"in{k}.jsonl", _batch_input(k)), purpose="batch") for k in range(2)]
    with pytest.raises(openai.NotFoundError):  # The oldest unused file made room.
      c.files.retrieve(early.id)
    running = [c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
               for f in ins]
    with pytest.raises(openai.RateLimitError) as e:  # Both file slots hold inputs of running batches.
      c.files.create(file=("x.jsonl", _batch_input()), purpose="batch")
    assert e.value.code == "too_many_files"
    with pytest.raises(openai.RateLimitError) as e:  # Both batch slots hold running batches.
      c.batches.create(input_file_id=ins[0].id, endpoint="/v1/chat/completions", completion_window="24h")
    assert e.value.code == "too_many_batches"
    backend.gate.set()
    for b in running:
      _wait(c, b.id)
    newer = c.files.create(file=("z.jsonl", _batch_input(9)), purpose="batch")
    third = c.batches.create(input_file_id=newer.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):  # The oldest finished batch was forgotten.
      c.batches.retrieve(running[0].id)
    assert [b.id for b in c.batches.list()] == [third.id, running[1].id]
    _wait(c, third.id)
    assert b'"custom_id": "r9"' in c.files.content(c.batches.retrieve(third.id).output_file_id).content


def test_batch_list_pages_newest_first_as_openai_does():
  app = server.create_app(synthetic.SyntheticBackend())
  with serving.BackgroundServer(app) as url:
    c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    f = c.files.create(file=("in.jsonl", _batch_input()), purpose="batch")
    made = [c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id
            for _ in range(5)]
    page = c.batches.list(limit=2)
    assert [b.id for b in page.data] == made[::-1][:2] and page.has_more
    assert [b.id for b in c.batches.list(limit=2)] == made[::-1]  # Auto-paging through `after`.
    assert [b.id for b in c.batches.list(after=made[1])] == [made[0]]
    with pytest.raises(openai.BadRequestError, match="limit"):
      c.batches.list(limit=0)
