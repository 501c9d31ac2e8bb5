"""kill -9 the collector mid-run, restart it: exactly the full set, no duplicates, no key on disk."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from configs import collect as collect_config
from proxykd.data import corpus, prompts as prompts_lib
from proxykd.teacher import collector, server, serving, synthetic

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-resume-test-9f8e7d6c5b4a"
N = 80


def _cmd(url, workdir):
  return [sys.executable, str(REPO / "main.py"), f"--config={REPO / 'configs' / 'collect.py'}", f"--workdir={workdir}",
          f"--config.teacher.base_url={url}", "--config.teacher.api_key_env=PROXYKD_RESUME_KEY",
          f"--config.prompts.num={N}", "--config.limits.concurrency=4", "--config.limits.backoff_base_s=0.02",
          "--config.teacher.max_tokens=128"]


def test_kill_9_and_resume(tmp_path):
  wd = tmp_path / "wd"
  logs = wd / "logs"
  logs.mkdir(parents=True)
  env = dict(os.environ, PROXYKD_RESUME_KEY=KEY)
  app = server.create_app(synthetic.SyntheticBackend(), api_key=KEY,
                          faults=server.Faults(latency_s=0.1, error_rate=0.1, seed=2))
  path = wd / "collect" / "corpus.jsonl"
  with serving.BackgroundServer(app) as url:
    with open(logs / "run1.log", "wb") as log:
      proc = subprocess.Popen(_cmd(url, wd), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
      deadline = time.monotonic() + 60
      while not (path.exists() and path.read_text().count("\n") >= 16):
        assert proc.poll() is None and time.monotonic() < deadline, (logs / "run1.log").read_text()[-2000:]
        time.sleep(0.05)
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    first = path.read_text()
    assert 16 <= first.count("\n") < N
    with open(path, "a") as f:  # What a crash mid-write leaves: a torn last line.
      f.write(first.splitlines()[0][:50])
    with open(logs / "run2.log", "wb") as log:
      subprocess.run(_cmd(url, wd), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, check=True, timeout=120)

  recs = list(corpus.read_corpus(path))  # Raises on a duplicate id or a bad line.
  c = collect_config.get_config()
  c.prompts.num, c.teacher.max_tokens = N, 128
  jobs, _, _ = collector.plan(prompts_lib.load_prompts(c.prompts), collector.teacher_params(c.teacher), 1,
                           c.teacher.system_prompt, set())
  assert sorted(r["id"] for r in recs) == sorted(i for j in jobs for i in j.ids)
  assert path.read_text().startswith(first)  # Append-only: the first run's lines are untouched.
  summary = json.loads((wd / "collect" / "summary.json").read_text())
  assert summary["already_present"] == first.count("\n") and summary["corpus_total"] == N
  written = [p for p in wd.rglob("*") if p.is_file()]
  assert {"config.json", "summary.json", "corpus.jsonl", "run1.log", "run2.log"} <= {p.name for p in written}
  for p in written:  # The key is in no file: corpus, summary, resolved config, logs.
    assert KEY not in p.read_text(errors="replace"), p
