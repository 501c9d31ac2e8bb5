"""Collection throughput against the local teacher server with API-like latency.

  python bench/collect.py [--requests 1024] [--concurrency 64] [--latency 0.5]

Runs the real `collect` stage (base_url=local: serve_teacher in a child process, HTTP on loopback)
and prints one JSON object; `throughput_vs_ideal` = requests/s divided by concurrency / latency.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import collect as collect_config  # noqa: E402  pylint: disable=wrong-import-position
from proxykd.stages import collect  # noqa: E402  pylint: disable=wrong-import-position


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--requests", type=int, default=1024)
  ap.add_argument("--concurrency", type=int, default=64)
  ap.add_argument("--latency", type=float, default=0.5)
  args = ap.parse_args()
  c = collect_config.get_config()
  c.progress = False
  c.prompts.num = args.requests
  c.limits.concurrency = args.concurrency
  c.local.latency_s = args.latency
  with tempfile.TemporaryDirectory() as wd:
    import contextlib, io  # pylint: disable=import-outside-toplevel,multiple-imports
    with contextlib.redirect_stdout(io.StringIO()):
      s = collect.run(c, wd)
  ideal = args.concurrency / args.latency
  print(json.dumps({"bench": "collect", "requests": s["requests"], "collected": s["collected"],
                    "concurrency": args.concurrency, "latency_s": args.latency, "ramp_up_s": c.limits.ramp_up_s, "elapsed_s": s["elapsed_s"],
                    "requests_per_s": s["requests_per_s"], "ideal_requests_per_s": ideal,
                    "throughput_vs_ideal": round(s["requests_per_s"] / ideal, 4)}))


if __name__ == "__main__":
  main()
