"""A Google Cloud Storage emulator on loopback, for tests of gs:// workdirs (no network, no account).

The server is gcp-storage-emulator (pure Python, in memory): the JSON API that gcsfs speaks, which
etils.epath uses for gs:// unless it finds TensorFlow (`client_env` tells it not to look). tensorstore's gcs driver (orbax's
array data) also relies on object generations, which that emulator does not implement: it neither
reports an object's generation on reads (`x-goog-generation`) nor honours the `ifGenerationMatch` /
`ifGenerationNotMatch` preconditions, so tensorstore's conditional writes (OCDBT manifests) fail at
random. `_with_generations` adds exactly those, as GCS defines them (generation "0": no object).

Clients find the emulator through `client_env(url)`.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import socket
from collections.abc import Iterator
from http import HTTPStatus

from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def client_env(url: str) -> dict[str, str]:
  """Environment variables that point every GCS client we use at the emulator at `url`."""
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs (etils.epath's gs:// backend)
      # etils.epath: gcsfs even where TensorFlow is installed (tf.io.gfile has no emulator setting).
      "EPATH_USE_TF": "false",
      "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs driver (orbax's arrays)
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: a fixed token, no credentials lookup
      # gcsfs: no bucket-type probe (a gRPC storage-control call the emulator does not serve).
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }


def _generation(storage, bucket: str, name: str) -> str:
  try:
    return str(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return "0"


def _with_generations(handler):
  """`handler` (an object GET, media upload or DELETE) with GCS's generation preconditions checked
  first and the object's generation reported in `x-goog-generation` after."""

  @functools.wraps(handler)
  def handle(request, response, storage, *args, **kwargs):
    bucket = request.params["bucket_name"]
    name = request.params.get("object_id") or (request.query.get("name") or [None])[0]
    if name is not None:
      current = _generation(storage, bucket, name)
      match, not_match = request.query.get("ifGenerationMatch"), request.query.get("ifGenerationNotMatch")
      if match and match[0] != current:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return
      if not_match and not_match[0] == current:
        response.status = HTTPStatus.NOT_MODIFIED
        return
    handler(request, response, storage, *args, **kwargs)
    if name is not None and response.status.value < 300 and _generation(storage, bucket, name) != "0":
      response["x-goog-generation"] = _generation(storage, bucket, name)

  return handle


class _QuietHandler(emulator.RequestHandler):
  """A client that hangs up before reading the whole answer (gcsfs stopping a read-ahead) is not
  worth a traceback on stderr."""

  def handle(self):
    try:
      super().handle()
    except ConnectionError:
      pass


@functools.cache
def _patch_emulator() -> None:
  """Generations on the object routes, quiet hang-ups, and no ERROR log line for each 404."""
  wrapped = {f: _with_generations(f) for f in (objects.get, objects.download, objects.insert,
                                               objects.delete)}
  for _, handlers in emulator.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler in wrapped:
        handlers[method] = wrapped[handler]
  emulator.RequestHandler = _QuietHandler
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running(bucket: str = "bucket") -> Iterator[str]:
  """An emulator on a free loopback port, in memory, with `bucket` created -> its URL."""
  _patch_emulator()
  port = _free_port()
  server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.start()
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.stop()
