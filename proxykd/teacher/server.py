"""An OpenAI-compatible chat-completions server (FastAPI) over a teacher backend.

Routes: GET /v1/models, POST /v1/chat/completions (messages, temperature, top_p, max_tokens or
max_completion_tokens, n, seed, stop, logprobs/top_logprobs; usage in OpenAI's schema), and the
/v1/files + /v1/batches subset of proxykd/teacher/batches.py. Errors use OpenAI's body
`{"error": {"message", "type", "param", "code"}}`.

Backends (proxykd/teacher/backend.py): the synthetic teacher (synthetic.py) and our models
(model_backend.py). Fault injection (tests, benchmarks) acts on chat completions
only: added latency (an async sleep, so concurrent requests overlap), an error rate mixing 429 (with
retry-after-ms) and 500, and a rate of connections dropped before the response completes.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import random
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect


@dataclasses.dataclass
class Faults:
  error_rate: float = 0.0  # fraction of chat requests answered 429 or 500 (half each)
  drop_rate: float = 0.0  # fraction of chat requests whose connection is closed mid-response
  latency_s: float = 0.0  # added to every chat request
  retry_after_s: float = 0.05  # sent with 429s as retry-after-ms
  seed: int = 0


class APIError(Exception):
  def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
               param: str | None = None, code: str | None = None, headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
    self.headers = headers


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
  return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(e: APIError, headers: dict | None = None) -> JSONResponse:
  return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status,
                      headers=headers or e.headers)


class _DropFilter(logging.Filter):
  """Silences uvicorn's complaint about the responses we abandon on purpose (dropped connections)."""

  def filter(self, record):
    return "without completing response" not in record.getMessage()


class FaultMiddleware:
  """Raw ASGI middleware: latency, injected 429/500 errors and dropped connections on chat calls."""

  def __init__(self, app, faults: Faults):
    self.app, self.faults, self.rng = app, faults, random.Random(faults.seed)
    logging.getLogger("uvicorn.error").addFilter(_DropFilter())
    self.injected = {"429": 0, "500": 0, "drop": 0}

  async def __call__(self, scope, receive, send):
    f = self.faults
    if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
      return await self.app(scope, receive, send)
    if f.latency_s > 0:
      await asyncio.sleep(f.latency_s)
    u = self.rng.random()
    if u < f.drop_rate:
      self.injected["drop"] += 1
      # Start a response promising a body, then return: the server closes the connection.
      await send({"type": "http.response.start", "status": 200,
                  "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")]})
      return
    if u < f.drop_rate + f.error_rate:
      status = 429 if self.rng.random() < 0.5 else 500
      self.injected[str(status)] += 1
      e = (APIError(429, "Rate limit reached (injected fault).", "rate_limit_exceeded", code="rate_limit_exceeded")
           if status == 429 else APIError(500, "The server had an error (injected fault).", "server_error"))
      headers = {"retry-after-ms": str(int(f.retry_after_s * 1000))} if status == 429 else None
      return await _error_response(e, headers)(scope, receive, send)
    return await self.app(scope, receive, send)


class BearerAuth:
  """Raw ASGI middleware (Starlette's BaseHTTPMiddleware costs ~1 ms a request): every /v1 route
  requires `Authorization: Bearer <api_key>`."""

  def __init__(self, app, api_key: str):
    self.app, self.expected = app, f"Bearer {api_key}".encode()

  async def __call__(self, scope, receive, send):
    if scope["type"] == "http" and scope["path"].startswith("/v1"):
      given = dict(scope["headers"]).get(b"authorization", b"")
      if not hmac.compare_digest(given, self.expected):
        e = APIError(401, "Incorrect API key provided.", "invalid_request_error", code="invalid_api_key")
        return await _error_response(e)(scope, receive, send)
    return await self.app(scope, receive, send)


def _param(body: dict, key: str, kind, default, lo=None, hi=None):
  v = body.get(key, default)
  if v is None:
    return default
  if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
    raise APIError(400, f"Invalid type for '{key}': expected {getattr(kind, '__name__', kind)}, got {v!r}.",
                   param=key, code="invalid_type")
  if (lo is not None and v < lo) or (hi is not None and v > hi):
    raise APIError(400, f"Invalid value for '{key}': {v} is outside [{lo}, {hi}].", param=key,
                   code="invalid_value")
  return v


def parse_chat_request(body: Any, model_name: str) -> dict:
  """Validated keyword arguments for `backend.complete` (+ messages), or APIError(400/404)."""
  if not isinstance(body, dict):
    raise APIError(400, "The request body must be a JSON object.")
  if body.get("model") != model_name:
    raise APIError(404, f"The model '{body.get('model')}' does not exist; this server serves '{model_name}'.",
                   param="model", code="model_not_found")
  msgs = body.get("messages")
  if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m for m in msgs):
    raise APIError(400, "'messages' must be a non-empty list of {role, content} objects.", param="messages")
  stop = body.get("stop") or []
  stop = [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
    raise APIError(400, "'stop' must be a string or a list of at most 4 strings.", param="stop")
  max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
  top_logprobs = _param(body, "top_logprobs", int, 0, 0, 20)
  logprobs = _param(body, "logprobs", bool, False)
  if top_logprobs and not logprobs:
    raise APIError(400, "'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
  return dict(messages=msgs, n=_param(body, "n", int, 1, 1, 128),
              temperature=float(_param(body, "temperature", (int, float), 1.0, 0, 2)),
              top_p=float(_param(body, "top_p", (int, float), 1.0, 0, 1)),
              max_tokens=_param({"max_tokens": max_tokens}, "max_tokens", int, None, 1, None),
              seed=_param(body, "seed", int, None), stop=stop,
              top_logprobs=top_logprobs, logprobs=logprobs)


def _token_json(text: str, logprob: float) -> dict:
  return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def completion_json(model: str, choices, prompt_tokens: int, logprobs: bool) -> dict:
  out = []
  for i, c in enumerate(choices):
    lp = None
    if logprobs:
      lp = {"content": [{**_token_json(t.text, t.logprob), "top_logprobs": [_token_json(s, l) for s, l in t.top]}
                        for t in c.tokens], "refusal": None}
    out.append({"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": lp, "finish_reason": c.finish_reason})
  completion_tokens = sum(len(c.tokens) for c in choices)
  return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
          "model": model, "system_fingerprint": None, "choices": out,
          "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}}


async def chat_completion(backend, body: Any, max_context: int) -> dict:
  """One chat completion as OpenAI's JSON; raises APIError for a request the server refuses."""
  kw = parse_chat_request(body, backend.model_name)
  prompt_tokens = backend.count_tokens(kw["messages"])
  if prompt_tokens + (kw["max_tokens"] or 0) > max_context:
    raise APIError(400, f"This model's maximum context length is {max_context} tokens. However, you requested "
                   f"{prompt_tokens + (kw['max_tokens'] or 0)} tokens ({prompt_tokens} in the messages, "
                   f"{kw['max_tokens'] or 0} in the completion). Please reduce the length of the messages.",
                   param="messages", code="context_length_exceeded")
  logprobs = kw.pop("logprobs")
  messages = kw.pop("messages")
  choices = await backend.complete(messages, **kw)
  return completion_json(backend.model_name, choices, prompt_tokens, logprobs)


def create_app(backend, *, api_key: str | None = None, faults: Faults | None = None,
               max_context: int = 4096, batch_concurrency: int = 16, max_upload_bytes: int = 512 << 20,
               max_files: int = 100, max_batches: int = 100):
  """The ASGI app. `api_key`: when set, every /v1 route requires `Authorization: Bearer <api_key>`.
  `max_upload_bytes`, `max_files`, `max_batches` bound the in-memory /v1/files and /v1/batches store."""
  from proxykd.teacher import batches  # pylint: disable=import-outside-toplevel

  app = FastAPI(title="proxykd teacher", docs_url=None, redoc_url=None)
  app.state.backend = backend
  app.state.max_context = max_context

  @app.exception_handler(APIError)
  async def _api_error(_request: Request, e: APIError):
    return _error_response(e)

  @app.get("/v1/models")
  async def _models():
    return {"object": "list", "data": [{"id": backend.model_name, "object": "model", "created": 0,
                                        "owned_by": "proxykd"}]}

  @app.post("/v1/chat/completions")
  async def _chat(request: Request):
    try:
      body = await request.json()
    except ValueError:
      raise APIError(400, "The request body is not valid JSON.") from None
    except ClientDisconnect:  # The client went away mid-request: nobody to answer.
      return Response(status_code=499)
    # A JSONResponse directly: FastAPI's jsonable_encoder walk would cost more than the backend.
    return JSONResponse(await chat_completion(backend, body, max_context))

  app.include_router(batches.router(backend, max_context, batch_concurrency, max_upload_bytes=max_upload_bytes,
                                    max_files=max_files, max_batches=max_batches))
  asgi = BearerAuth(app, api_key) if api_key else app
  if faults and (faults.error_rate or faults.drop_rate or faults.latency_s):
    asgi = FaultMiddleware(asgi, faults)
  return asgi
