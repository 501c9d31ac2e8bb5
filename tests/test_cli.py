"""main.py: config flags, unknown keys, the resolved config, paths relative to the caller's
directory, and the export stage end to end. main.py's error messages: test_cli_errors.py."""
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np

from conftest import REPO
from hf_reference import hf_logits
from proxykd import runner
from proxykd.models import Transformer, init_params, preset
from proxykd.models import checkpoint


def _main(*args, env=None, cwd=REPO):
  return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300, env=env)


def _tiny_checkpoint(directory, tokenizer_dir, vocab_size=384):
  cfg = preset("tiny", vocab_size=vocab_size)
  params = init_params(cfg, jax.random.PRNGKey(0))
  checkpoint.save_checkpoint(directory, 3, params, {"model": cfg.to_dict(), "tokenizer": str(tokenizer_dir)})
  return cfg, params


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


def test_relative_paths_are_resolved_against_the_callers_directory(tmp_path, demo_tokenizer_dir):
  """README-style relative --workdir and --config.* paths, run from another directory: orbax
  needs absolute checkpoint paths, and the recorded config names the files actually used."""
  _tiny_checkpoint(tmp_path / "runs" / "ckpt", demo_tokenizer_dir)
  shutil.copytree(demo_tokenizer_dir, tmp_path / "tok")
  proc = _main(f"--config={REPO}/configs/export.py", "--workdir=runs/demo",
               "--config.checkpoint=runs/ckpt", "--config.tokenizer=./tok",
               "--config.output=runs/../hf_out", "--config.dtype=float32", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  resolved = json.loads((tmp_path / "runs" / "demo" / "export" / "config.json").read_text())
  assert resolved["checkpoint"] == str(tmp_path / "runs" / "ckpt")
  assert resolved["tokenizer"] == str(tmp_path / "tok")
  assert resolved["output"] == str(tmp_path / "hf_out")
  assert (tmp_path / "hf_out" / "model.safetensors").exists()
  assert (tmp_path / "hf_out" / "tokenizer.json").exists()
  assert not list(tmp_path.rglob("*orbax-checkpoint-tmp*"))


def test_resolve_paths_makes_path_keys_absolute_at_any_depth(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = ml_collections.ConfigDict(dict(
      stage="export", checkpoint="runs/ckpt", output="", dtype="bfloat16", name="runs/x",
      prompts=dict(path="data/p.jsonl", data_dir="gs://bucket/data", split="train"),
      local=dict(hf_dir="~/models/m", tokenizer="memory://tok", checkpoint="/abs/ckpt"),
      data=dict(cache=True)))
  config.lock()
  resolved = runner.resolve_paths(config)
  assert resolved.checkpoint == str(tmp_path / "runs" / "ckpt")
  assert resolved.prompts.path == str(tmp_path / "data" / "p.jsonl")
  assert resolved.local.hf_dir == os.path.join(os.path.expanduser("~"), "models", "m")
  # URLs, absolute paths, empty values and keys not in PATH_KEYS are left as they are.
  assert resolved.prompts.data_dir == "gs://bucket/data" and resolved.local.tokenizer == "memory://tok"
  assert resolved.local.checkpoint == "/abs/ckpt" and resolved.output == ""
  assert resolved.name == "runs/x" and resolved.prompts.split == "train" and resolved.data.cache
  assert config.checkpoint == "runs/ckpt"  # The caller's config is not modified ...
  assert resolved.is_locked  # ... and the copy is as locked as it was.
  assert runner.absolute_path("s3://b/k") == "s3://b/k" and runner.absolute_path("") == ""
