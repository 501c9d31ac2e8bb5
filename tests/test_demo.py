"""README promise 1: the demo command runs end to end (here minus the pip install)."""
import re
import shlex
import subprocess
import sys

from conftest import REPO


def _demo_commands():
  readme = (REPO / "README.md").read_text()
  block = readme.split("1. Install and run the built-in demo", 1)[1].split("\n2.", 1)[0]
  line = next(l.strip() for l in block.splitlines() if "main.py" in l)
  steps = [s.strip() for s in line.split("&&")]
  assert steps[0] == "pip install -r requirements.txt"
  return [shlex.split(s) for s in steps[1:]]


def test_readme_demo_runs(tmp_path):
  commands = _demo_commands()
  assert [c[1] for c in commands][-1].startswith("main.py")
  for argv in commands:
    assert argv[0] == "python"
    argv = [sys.executable] + [re.sub(r"^--workdir=.*", f"--workdir={tmp_path}", a) for a in argv[1:]]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{argv}\n{proc.stderr[-3000:]}"
  hf = tmp_path / "proxy_sft" / "hf"
  assert (hf / "model.safetensors").exists() and (hf / "tokenizer.json").exists()
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(hf)
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
  assert model.config.vocab_size == len(tokenizer)
