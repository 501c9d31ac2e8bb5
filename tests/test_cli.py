"""main.py: config flags, unknown keys, the resolved config, and the export stage end to end."""
import json
import subprocess
import sys

import jax
import numpy as np

from conftest import REPO
from hf_reference import hf_logits
from proxykd import runner
from proxykd.models import Transformer, init_params, preset
from proxykd.train import checkpoint


def _main(*args, env=None):
  return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=env)


def test_unknown_config_key_is_refused_by_name(tmp_path):
  proc = _main("--config=configs/export.py", f"--workdir={tmp_path}", "--config.no_such_key=1")
  assert proc.returncode != 0
  assert "no_such_key" in proc.stderr
  assert not (tmp_path / "export").exists()  # Nothing ran.


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  proc = _main("--config=configs/export.py", f"--workdir={tmp_path}",
               f"--config.checkpoint={tmp_path}/nowhere")
  assert proc.returncode == 2
  assert f"{tmp_path}/nowhere does not exist" in proc.stderr


def test_export_stage_writes_an_hf_directory(tmp_path, demo_tokenizer_dir):
  cfg = preset("tiny", vocab_size=384, lora_rank=2)
  params = init_params(cfg, jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map_with_path(  # Non-zero adapters: the export must merge them.
      lambda p, x: x + 0.01 if "lora_b" in jax.tree_util.keystr(p) else x, params)
  checkpoint.save_checkpoint(tmp_path / "ckpt", 3, params,
                             {"model": cfg.to_dict(), "tokenizer": str(demo_tokenizer_dir)})
  out = tmp_path / "hf"
  proc = _main("--config=configs/export.py", f"--workdir={tmp_path}",
               f"--config.checkpoint={tmp_path}/ckpt", f"--config.output={out}",
               "--config.dtype=float32")
  assert proc.returncode == 0, proc.stderr[-3000:]
  resolved = json.loads((tmp_path / "export" / "config.json").read_text())
  assert resolved["checkpoint"] == f"{tmp_path}/ckpt" and resolved["stage"] == "export"

  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.chat_template and model.config.eos_token_id == tok.eos_token_id
  tokens = np.arange(20)[None] % 384
  ours = Transformer(cfg).apply({"params": params}, tokens)
  np.testing.assert_array_less(np.abs(hf_logits(model, tokens) - np.asarray(ours)).max(), 1e-4)


def test_redact_drops_secret_values_but_keeps_env_var_names():
  tree = {"teacher": {"api_key_env": "OPENAI_API_KEY", "api_key": "sk-live", "token": ""},
          "wandb": {"password": "hunter2", "project": "p"}}
  assert runner.redact(tree) == {
      "teacher": {"api_key_env": "OPENAI_API_KEY", "api_key": "<redacted>", "token": ""},
      "wandb": {"password": "<redacted>", "project": "p"}}
