"""Stage `serve_teacher`: an OpenAI-compatible server over the synthetic teacher or one of our models.

Writes <workdir>/serve_teacher/server.json ({"base_url", "model", "pid"}) once it listens, and runs
until interrupted (or, with `parent_pid`, until that process is gone). A host other than loopback
requires a key (`api_key_env`): the server would otherwise answer anyone on the network.
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import threading
import time

from absl import logging

from proxykd import runner
from proxykd.teacher import server, serving


def make_backend(config):
  if config.backend == "synthetic":
    from proxykd.teacher.synthetic import SyntheticBackend  # pylint: disable=import-outside-toplevel
    backend = SyntheticBackend()
  elif config.backend == "model":
    from proxykd.teacher.model_backend import ModelBackend  # pylint: disable=import-outside-toplevel
    backend = ModelBackend.from_config(config)
  else:
    raise runner.UserError(f"serve_teacher: backend={config.backend!r}; choose synthetic or model")
  if config.model_name:
    backend.model_name = config.model_name
  return backend


def required_key(env_name: str) -> str | None:
  if not env_name:
    return None
  key = os.environ.get(env_name)
  if not key:
    raise runner.UserError(f"serve_teacher: api_key_env={env_name!r} but that environment variable is empty")
  return key


def is_loopback(host: str) -> bool:
  """Whether every address `host` resolves to is a loopback address ("" and 0.0.0.0 are not)."""
  if not host:
    return False
  try:
    infos = socket.getaddrinfo(host, None)
  except (socket.gaierror, UnicodeError):
    return False
  return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_exposure(config) -> None:
  """Refuse to serve without a key on anything but loopback."""
  if not config.api_key_env and not is_loopback(config.host):
    raise runner.UserError(f"serve_teacher: host={config.host!r} is not a loopback address (other machines "
                           "could reach the server) and api_key_env is empty; set api_key_env to the NAME of a "
                           "variable holding a bearer token, or host=127.0.0.1")


def _watch_parent(parent_pid: int, srv) -> None:
  while not srv.should_exit:
    if os.getppid() != parent_pid:
      logging.warning("serve_teacher: parent %d is gone; shutting down", parent_pid)
      srv.should_exit = True
    time.sleep(0.5)


def run(config, workdir):
  check_exposure(config)
  key = required_key(config.api_key_env)
  for name, value in (("max_upload_mb", config.max_upload_mb), ("max_files", config.max_files),
                      ("max_batches", config.max_batches)):
    if value <= 0:
      raise runner.UserError(f"serve_teacher: {name}={value} must be > 0")
  backend = make_backend(config)
  faults = server.Faults(**config.faults.to_dict())
  app = server.create_app(backend, api_key=key, faults=faults, max_context=config.max_context,
                          batch_concurrency=config.batch_concurrency,
                          max_upload_bytes=int(config.max_upload_mb * 2 ** 20), max_files=config.max_files,
                          max_batches=config.max_batches)
  sock = serving.bind(config.host, config.port)
  url = serving.base_url(sock)
  out = runner.stage_dir(workdir, "serve_teacher")
  out.mkdir(parents=True, exist_ok=True)
  tmp = out / "server.json.tmp"
  tmp.write_text(json.dumps({"base_url": url, "model": backend.model_name, "pid": os.getpid()}))
  tmp.rename(out / "server.json")
  srv = serving.make_server(app, config.log_level)
  if config.parent_pid:
    threading.Thread(target=_watch_parent, args=(config.parent_pid, srv), daemon=True).start()
  logging.info("serve_teacher: %s serving %r at %s", config.backend, backend.model_name, url)
  print(f"serving {backend.model_name} at {url}", flush=True)
  srv.run(sockets=[sock])
  return url
