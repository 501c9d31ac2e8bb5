"""Serve a teacher behind an OpenAI-compatible API (FastAPI + uvicorn), on 127.0.0.1 by default.

  python main.py --config=configs/serve_teacher.py --workdir=DIR                 # synthetic teacher
  python main.py --config=configs/serve_teacher.py:backend=model --workdir=DIR \
      --config.checkpoint=DIR/proxy_sft/checkpoints                              # our checkpoint
  python main.py --config=configs/serve_teacher.py:backend=model --workdir=DIR --config.hf_dir=PATH
  python main.py --config=configs/serve_teacher.py:faults --workdir=DIR          # flaky, slow teacher

The bound address goes to <workdir>/serve_teacher/server.json (port 0 picks a free port).
"""
import ml_collections

from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, backend="synthetic", faults=False, runlocal=False)
  c = ml_collections.ConfigDict()
  c.stage = "serve_teacher"
  c.host = "127.0.0.1"  # Loopback only unless you mean it (any other host requires api_key_env).
  c.port = 8000
  c.backend = arg.backend  # synthetic | model
  c.model_name = ""  # The name clients must send as `model`; default: the backend's own name.
  c.api_key_env = ""  # NAME of an env var holding a bearer token to require; empty: no check.
  c.max_context = 4096  # Prompt + max_tokens above this is refused (400 context_length_exceeded).
  c.batch_concurrency = 16  # Requests of one /v1/batches job run at once.
  # The in-memory /v1/files + /v1/batches store: larger uploads get 413; beyond the counts the
  # oldest finished files/batches are forgotten (429 when all are in use).
  c.max_upload_mb = 512.0
  c.max_files = 100
  c.max_batches = 100
  c.log_level = "warning"
  c.parent_pid = 0  # Exit when this process is gone (set by `collect` when it starts the server).
  # Backend `model`: an HF directory, or one of our checkpoints plus a tokenizer directory.
  c.hf_dir = ""
  c.checkpoint = ""
  c.tokenizer = ""  # default: the HF dir, or the tokenizer recorded in the checkpoint
  c.max_batch = 8  # Requests sampled together in one generate() call.
  # Fault injection on /v1/chat/completions (tests and benchmarks).
  c.faults = ml_collections.ConfigDict(dict(error_rate=0.0, drop_rate=0.0, latency_s=0.0,
                                            retry_after_s=0.05, seed=0))
  if arg.faults:
    c.faults.update(error_rate=0.1, drop_rate=0.05, latency_s=0.2)
  if arg.runlocal:
    c.port = 0
  return c
