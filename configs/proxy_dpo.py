"""Stage `proxy_dpo`: align the proxy with the teacher, K rounds of DPO on D_p (METHOD.md stage 1).

  python main.py --config=configs/proxy_dpo.py --workdir=DIR              # after proxy_sft
  python main.py --config=configs/proxy_dpo.py:runlocal --workdir=DIR     # a quick CPU run (2 rounds)
  python main.py --config=configs/proxy_dpo.py --workdir=DIR --config.model.lora_rank=16 \
      --config.mesh.fsdp=-1 --config.mesh.tensor=8

Round k: the proxy samples one response per prompt of the round (rejected), the teacher's answer
is chosen, the reference is the proxy at the start of the round; loss = nll_weight * NLL(chosen)
+ lam * preference loss. Variant flags: runlocal, mesh=<preset>, pod=<layout> (configs/pods).
"""
import ml_collections

from configs import common, pods
from proxykd.data import pipeline, split
from proxykd.train import optimizer


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, mesh="fsdp", pod=pods.NONE)
  config = ml_collections.ConfigDict()
  config.stage = "proxy_dpo"
  config.corpus = ""  # Teacher corpus; default <workdir>/collect/corpus.jsonl.
  config.split_name = "align"  # D_p.
  config.tokenizer = ""  # Default: the one the starting checkpoint records, else as proxy_sft.
  # Where the proxy starts: one of our checkpoints or an HF directory; default
  # <workdir>/proxy_sft/checkpoints (the warm-up SFT model).
  config.init_from = ""
  # Only the run fields apply (dtype, param_dtype, remat, lora_*): the shape is init_from's. With
  # lora_rank > 0 the starting model is merged into the base and fresh adapters train.
  config.model = common.model_config("tiny")
  config.mesh = common.mesh_config(arg.mesh)
  config.split = split.default_config()
  config.data = pipeline.default_config()
  config.data.seq_len = 1024  # Paper: max length 1024 (a pair shares one row: half each).
  config.optim = optimizer.default_config()
  config.optim.update(name="adam", lr=1e-5, schedule="constant", warmup_steps=0)  # Paper.
  config.train = ml_collections.ConfigDict(dict(
      steps=0, epochs=1.0,  # per round: epochs over the round's pairs (paper: 1)
      batch_size=16,  # rows per step (each row holds one or more chosen/rejected pairs)
      grad_accum=1, seed=0, loss_chunk=256,
      log_every=10, eval_every=0, save_every=100, keep=2, async_save=True, progress_bar=True))
  config.dpo = ml_collections.ConfigDict(dict(
      rounds=16,  # K (paper: 16)
      all_each_round=False,  # False: D_p is split into K parts, one per round; True: all of D_p
      loss="sigmoid",  # sigmoid (DPO) | ipo | hinge
      beta=0.1,  # paper: not reported; DPO's default
      lam=1.0,  # weight of the preference loss (paper: 1)
      nll_weight=1.0,  # weight of the chosen response's NLL
      reference="round_start",  # round_start (the proxy at the start of the round) | warmup
      max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0,  # sampling the rejected response
      sample_batch=64,  # prompts per sampling call (padded: one compiled program per prompt length)
      on_empty="drop", on_truncated="keep", on_identical="drop",  # degenerate samples: keep | drop
      seed=0))
  config.export = True  # <workdir>/proxy_dpo/hf at the end (LoRA merged).
  config.export_dtype = "float32"
  config.wandb = ml_collections.ConfigDict(dict(project="", entity="", name=""))
  if arg.runlocal:
    config.data.seq_len = 384  # a demo pair: a ~150-token chosen and a <= 96-token sample + prompt
    config.dpo.update(rounds=2, max_new_tokens=96, sample_batch=16)
    # The tiny warm-up proxy is far from the teacher: 3 passes over each round's pairs.
    config.train.update(batch_size=4, epochs=3.0, log_every=5, save_every=10)
    config.optim.update(lr=1e-3)
  return pods.apply(config, arg.pod, config.stage)
