"""The subset of OpenAI's Files and Batch APIs that the batch mode of `collect` uses, in memory.

POST /v1/files (multipart: file, purpose), GET /v1/files/{id}, GET /v1/files/{id}/content,
DELETE /v1/files/{id}; POST /v1/batches, GET /v1/batches (newest first; `after`, `limit` and
`has_more` as OpenAI pages them), GET /v1/batches/{id}, POST /v1/batches/{id}/cancel.
A batch runs in the background through the same backend as /v1/chat/completions (no injected
faults): each input line {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}
gives one output line {"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}; successes go to the output file, refused requests (4xx) to the error file, as OpenAI does.

State lives in memory (a restarted server has forgotten its files and batches) and is bounded:
an upload larger than `max_upload_bytes` is refused with 413 as soon as its size is known (from
Content-Length, or while it streams in), never read whole into memory; at most `max_files` files
and `max_batches` batches are kept, the oldest finished ones (files no running batch reads,
batches in a terminal state) forgotten to make room, and a request refused with 429 when every
slot is in use.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from proxykd.teacher.server import APIError, chat_completion, error_body

_TERMINAL = ("completed", "failed", "expired", "cancelled")
_FORM_SLACK = 64 * 1024  # multipart boundaries, part headers and the `purpose` field around the file


def _now() -> int:
  return int(time.time())


def _too_large(limit: int) -> APIError:
  # Connection: close makes uvicorn hang up after the answer instead of draining the rest of the body.
  return APIError(413, f"The file is larger than this server's upload limit of {limit} bytes (max_upload_mb).",
                  param="file", code="file_too_large", headers={"connection": "close"})


def _limited(receive, limit: int):
  """An ASGI `receive` that raises 413 once the body exceeds an upload of `limit` bytes plus its form."""
  seen = 0

  async def wrapped():
    nonlocal seen
    message = await receive()
    if message["type"] == "http.request":
      seen += len(message.get("body", b""))
      if seen > limit + _FORM_SLACK:
        raise _too_large(limit)
    return message
  return wrapped


def router(backend, max_context: int, concurrency: int, *, max_upload_bytes: int = 512 << 20,
           max_files: int = 100, max_batches: int = 100) -> APIRouter:
  r = APIRouter(prefix="/v1")
  files: dict[str, dict] = {}  # id -> FileObject json + "_data"
  batches: dict[str, dict] = {}
  tasks: set[asyncio.Task] = set()

  def running_inputs() -> set[str]:
    return {b["input_file_id"] for b in batches.values() if b["status"] not in _TERMINAL}

  def make_room(store: dict, cap: int, evictable, what: str, refuse: bool = True) -> None:
    """Forget the oldest evictable entries of `store` until one more fits under `cap`."""
    while len(store) >= cap:
      old = next((k for k, v in store.items() if evictable(v)), None)
      if old is None:
        if not refuse:
          return  # A batch's own output: kept even above the cap (bounded by max_batches).
        raise APIError(429, f"This server holds its maximum of {cap} {what}, all in use by running batches; "
                       "retry when some have finished.", "rate_limit_exceeded", code=f"too_many_{what}")
      del store[old]

  def add_file(data: bytes, filename: str, purpose: str, refuse: bool = True) -> dict:
    in_use = running_inputs()
    make_room(files, max_files, lambda f: f["id"] not in in_use, "files", refuse)
    fid = f"file-{uuid.uuid4().hex[:24]}"
    files[fid] = {"id": fid, "object": "file", "bytes": len(data), "created_at": _now(), "filename": filename,
                  "purpose": purpose, "status": "processed", "expires_at": None, "status_details": None,
                  "_data": data}
    return public(files[fid])

  def public(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if not k.startswith("_")}

  def get(store: dict, key: str, what: str) -> dict:
    if key not in store:
      raise APIError(404, f"No such {what}: '{key}'.", code="not_found")
    return store[key]

  async def one(line: dict, sem: asyncio.Semaphore) -> tuple[bool, dict]:
    async with sem:
      rid = f"req_{uuid.uuid4().hex[:24]}"
      try:
        body, status = await chat_completion(backend, line.get("body"), max_context), 200
      except APIError as e:
        body, status = error_body(e.message, e.type, e.param, e.code), e.status
      out = {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": line.get("custom_id"),
             "response": {"status_code": status, "request_id": rid, "body": body}, "error": None}
      return status == 200, out

  def parse_input(b: dict, data: bytes) -> list[dict] | None:
    lines, errors = [], []
    for i, text in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
      if not text.strip():
        continue
      try:
        obj = json.loads(text)
      except ValueError:
        errors.append({"code": "invalid_json_line", "message": "This line is not valid JSON.", "line": i})
        continue
      if obj.get("url") != b["endpoint"] or not obj.get("custom_id"):
        errors.append({"code": "invalid_request", "line": i,
                       "message": f"Each line needs a custom_id and url '{b['endpoint']}'."})
      lines.append(obj)
    ids = [o.get("custom_id") for o in lines]
    if len(set(ids)) != len(ids):
      errors.append({"code": "duplicate_custom_id", "message": "custom_id values must be unique.", "line": None})
    if errors:
      b.update(status="failed", failed_at=_now(), errors={"object": "list", "data": errors})
      return None
    return lines

  async def run(b: dict) -> None:
    lines = parse_input(b, files[b["input_file_id"]]["_data"])
    if lines is None:
      return
    b.update(status="in_progress", in_progress_at=_now())
    b["request_counts"]["total"] = len(lines)
    sem, outs, errs = asyncio.Semaphore(concurrency), [], []
    for fut in asyncio.as_completed([one(line, sem) for line in lines]):
      ok, out = await fut
      (outs if ok else errs).append(out)
      b["request_counts"]["completed" if ok else "failed"] += 1
    if b["status"] != "cancelled":  # A cancelled batch still gets its partial results, as OpenAI does.
      b.update(status="finalizing", finalizing_at=_now())
    if outs:
      b["output_file_id"] = add_file(_jsonl(outs), f"{b['id']}_output.jsonl", "batch_output", refuse=False)["id"]
    if errs:
      b["error_file_id"] = add_file(_jsonl(errs), f"{b['id']}_error.jsonl", "batch_output", refuse=False)["id"]
    if b["status"] == "finalizing":
      b.update(status="completed", completed_at=_now())

  @r.post("/files")
  async def create_file(request: Request):
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_upload_bytes + _FORM_SLACK:
      raise _too_large(max_upload_bytes)  # Refused before reading any of it.
    limited = Request(request.scope, _limited(request.receive, max_upload_bytes))
    # Starlette spools file parts to disk beyond 1 MB; `_limited` stops a body that keeps coming.
    async with limited.form(max_files=1, max_fields=4) as form:
      file, purpose = form.get("file"), form.get("purpose")
      if not isinstance(file, UploadFile):
        raise APIError(400, "A multipart 'file' part is required.", param="file")
      if not isinstance(purpose, str) or not purpose:
        raise APIError(400, "A 'purpose' field is required.", param="purpose")
      if (file.size or 0) > max_upload_bytes:
        raise _too_large(max_upload_bytes)
      return add_file(await file.read(), file.filename or "upload.jsonl", purpose)

  @r.get("/files/{file_id}")
  async def retrieve_file(file_id: str):
    return public(get(files, file_id, "file"))

  @r.get("/files/{file_id}/content")
  async def file_content(file_id: str):
    return Response(get(files, file_id, "file")["_data"], media_type="application/octet-stream")

  @r.delete("/files/{file_id}")
  async def delete_file(file_id: str):
    get(files, file_id, "file")
    del files[file_id]
    return {"id": file_id, "object": "file", "deleted": True}

  @r.post("/batches")
  async def create_batch(body: dict):
    fid = body.get("input_file_id")
    get(files, fid, "file")
    if body.get("endpoint") != "/v1/chat/completions":
      raise APIError(400, "Only the /v1/chat/completions endpoint is supported.", param="endpoint")
    make_room(batches, max_batches, lambda b: b["status"] in _TERMINAL, "batches")
    bid = f"batch_{uuid.uuid4().hex[:24]}"
    b = batches[bid] = {
        "id": bid, "object": "batch", "endpoint": body["endpoint"], "errors": None, "input_file_id": fid,
        "completion_window": body.get("completion_window", "24h"), "status": "validating",
        "output_file_id": None, "error_file_id": None, "created_at": _now(), "in_progress_at": None,
        "expires_at": _now() + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
        "expired_at": None, "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": body.get("metadata")}
    task = asyncio.get_running_loop().create_task(run(b))
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return b

  @r.get("/batches")
  async def list_batches(after: str | None = None, limit: int = 20):
    if not 1 <= limit <= 100:
      raise APIError(400, f"Invalid value for 'limit': {limit} is outside [1, 100].", param="limit",
                     code="invalid_value")
    newest_first = list(reversed(batches.values()))
    start = 0
    if after is not None:
      start = next((k + 1 for k, b in enumerate(newest_first) if b["id"] == after), None)
      if start is None:
        raise APIError(404, f"No such batch: '{after}'.", param="after", code="not_found")
    page = newest_first[start:start + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(newest_first)}

  @r.get("/batches/{batch_id}")
  async def retrieve_batch(batch_id: str):
    return get(batches, batch_id, "batch")

  @r.post("/batches/{batch_id}/cancel")
  async def cancel_batch(batch_id: str):
    b = get(batches, batch_id, "batch")
    if b["status"] not in _TERMINAL:
      b.update(status="cancelled", cancelling_at=_now(), cancelled_at=_now())
    return b

  return r


def _jsonl(objs: list[dict]) -> bytes:
  return "".join(json.dumps(o) + "\n" for o in objs).encode("utf-8")
