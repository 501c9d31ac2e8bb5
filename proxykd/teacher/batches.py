"""The subset of OpenAI's Files and Batch APIs that the batch mode of `collect` uses, in memory.

POST /v1/files (multipart: file, purpose), GET /v1/files/{id}, GET /v1/files/{id}/content,
DELETE /v1/files/{id}; POST /v1/batches, GET /v1/batches/{id}, POST /v1/batches/{id}/cancel.
A batch runs in the background through the same backend as /v1/chat/completions (no injected
faults): each input line {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}
gives one output line {"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}; successes go to the output file, refused requests (4xx) to the error file, as OpenAI does.
State lives in memory: a restarted server has forgotten its files and batches.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Form, UploadFile
from fastapi.responses import Response

from proxykd.teacher.server import APIError, chat_completion, error_body

_TERMINAL = ("completed", "failed", "expired", "cancelled")


def _now() -> int:
  return int(time.time())


def router(backend, max_context: int, concurrency: int) -> APIRouter:
  r = APIRouter(prefix="/v1")
  files: dict[str, dict] = {}  # id -> FileObject json + "_data"
  batches: dict[str, dict] = {}
  tasks: set[asyncio.Task] = set()

  def add_file(data: bytes, filename: str, purpose: str) -> dict:
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
      b["output_file_id"] = add_file(_jsonl(outs), f"{b['id']}_output.jsonl", "batch_output")["id"]
    if errs:
      b["error_file_id"] = add_file(_jsonl(errs), f"{b['id']}_error.jsonl", "batch_output")["id"]
    if b["status"] == "finalizing":
      b.update(status="completed", completed_at=_now())

  @r.post("/files")
  async def create_file(file: UploadFile, purpose: str = Form(...)):
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
