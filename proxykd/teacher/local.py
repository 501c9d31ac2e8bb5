"""Start `serve_teacher` as a child process for one collection run (`teacher.base_url="local"`).

The child binds a free loopback port and reports it in <workdir>/serve_teacher/server.json; it
requires a random bearer token handed over in its environment (never on the command line), and
exits by itself if the collector dies (parent_pid watchdog).
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from proxykd import runner

REPO = Path(__file__).resolve().parents[2]
TOKEN_ENV = "PROXYKD_LOCAL_TEACHER_TOKEN"


class LocalTeacher:
  """`with LocalTeacher(local_cfg, workdir, log_path) as (base_url, token):`"""

  def __init__(self, local, workdir: str, log_path: str, model_name: str = ""):
    self.local, self.workdir, self.log_path, self.model_name = local, workdir, log_path, model_name
    self.token = secrets.token_urlsafe(24)
    self.proc: subprocess.Popen | None = None

  def _args(self) -> list[str]:
    loc = self.local
    args = [sys.executable, str(REPO / "main.py"), f"--config={REPO / 'configs' / 'serve_teacher.py'}",
            f"--workdir={self.workdir}", "--config.port=0", f"--config.api_key_env={TOKEN_ENV}",
            f"--config.parent_pid={os.getpid()}", f"--config.backend={loc.backend}",
            f"--config.faults.latency_s={loc.latency_s}", f"--config.faults.error_rate={loc.error_rate}",
            f"--config.faults.drop_rate={loc.drop_rate}", f"--config.faults.seed={loc.seed}"]
    if self.model_name:  # Serve under the name the collector asks for.
      args.append(f"--config.model_name={self.model_name}")
    for key in ("hf_dir", "checkpoint", "tokenizer"):
      if loc[key]:
        args.append(f"--config.{key}={loc[key]}")
    return args

  def __enter__(self) -> tuple[str, str]:
    info = runner.stage_dir(self.workdir, "serve_teacher") / "server.json"
    if info.exists():
      info.unlink()
    env = dict(os.environ, **{TOKEN_ENV: self.token})
    with open(self.log_path, "ab") as log:
      self.proc = subprocess.Popen(self._args(), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
    deadline = time.monotonic() + self.local.startup_timeout_s
    while not info.exists():
      if self.proc.poll() is not None:
        raise runner.UserError(f"the local teacher server exited with code {self.proc.returncode}; "
                               f"see {self.log_path}")
      if time.monotonic() > deadline:
        self.__exit__()
        raise runner.UserError(f"the local teacher server did not start within "
                               f"{self.local.startup_timeout_s}s; see {self.log_path}")
      time.sleep(0.05)
    return json.loads(info.read_text())["base_url"], self.token

  def __exit__(self, *exc) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
