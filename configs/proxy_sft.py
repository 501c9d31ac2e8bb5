"""Stage `proxy_sft`: warm-up SFT of the proxy on the D_w split of the teacher corpus.

  python main.py --config=configs/proxy_sft.py --workdir=DIR
  python main.py --config=configs/proxy_sft.py:runlocal --workdir=DIR      # a quick CPU smoke run
  python main.py --config=configs/proxy_sft.py --workdir=DIR \
      --config.init_from=/models/Llama-2-70b-hf --config.model.lora_rank=16 --config.mesh.tensor=8

Variant flags (after the colon): runlocal, model=<preset> (random init), mesh=<preset>,
pod=<layout> (a pod layout of configs/pods: mesh, batch, remat, LoRA; launch/README.md).
"""
import ml_collections

from configs import common, pods
from proxykd.data import pipeline, split
from proxykd.train import optimizer


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, model="tiny", mesh="fsdp", pod=pods.NONE)
  config = ml_collections.ConfigDict()
  config.stage = "proxy_sft"
  config.corpus = ""  # Teacher corpus (JSON lines); default <workdir>/collect/corpus.jsonl.
  config.split_name = "warmup"  # Which split to train on: warmup (D_w) | align | distill | all.
  # Tokenizer directory; default: init_from, else <workdir>/collect/tokenizer, else <workdir>/tokenizer/hf.
  config.tokenizer = ""
  config.init_from = ""  # An HF model directory to start from; empty: random init of config.model.
  config.model = common.model_config(arg.model)  # With init_from only dtype/remat/lora_* apply.
  config.mesh = common.mesh_config(arg.mesh)
  config.split = split.default_config()
  config.data = pipeline.default_config()
  config.optim = optimizer.default_config()
  config.train = ml_collections.ConfigDict(dict(
      steps=1000, epochs=0.0,  # epochs > 0 overrides steps
      batch_size=16,  # The global batch (rows of data.seq_len tokens), split over mesh data x fsdp.
      grad_accum=1,  # Micro-batches per step, inside the one jitted step.
      seed=0,
      loss_chunk=256,  # Positions per lm_head chunk of the loss (memory: batch x chunk x vocab).
      # Every this many steps, and always at the last step; 0: only at the last step.
      log_every=10,  # metrics.jsonl, TensorBoard, W&B, the progress bar's loss
      eval_every=200,  # held-out loss (when the split has held-out records)
      save_every=200,  # a checkpoint (the resume point of a killed run)
      keep=3,  # Checkpoints kept (the latest ones).
      async_save=True, progress_bar=True))
  config.export = True  # Also write an HF directory (<workdir>/proxy_sft/hf), LoRA merged.
  config.export_dtype = "float32"
  # W&B (when project is set; `pip install wandb`). It receives the resolved config through
  # proxykd.runner.redact, like config.json: secrets are never sent.
  config.wandb = ml_collections.ConfigDict(dict(project="", entity="", name=""))
  if arg.runlocal:
    config.data.seq_len = 256
    config.train.update(steps=20, batch_size=4, log_every=5, eval_every=10, save_every=10)
    config.optim.update(lr=1e-3, warmup_steps=2)
  return pods.apply(config, arg.pod, config.stage)
