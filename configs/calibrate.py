"""Stage `calibrate`: choose the estimator's (kappa, m, tau, n-gram order, smoothing) by held-out likelihood.

  python main.py --config=configs/calibrate.py --workdir=DIR           # after prior and proxy_sft/dpo
  python main.py --config=configs/calibrate.py:runlocal --workdir=DIR  # the CPU demo

Scores the held-out teacher tokens under p_hat WITHOUT the label (METHOD.md Stage 2) over the grid,
one proxy forward per batch for all settings. Writes DIR/calibrate/: table.json, chosen.json (read
by the distillation stages; m = inf is written Infinity), calibration.png. Grid lists are tuples;
write infinity as 1e999 on the command line, e.g. --config.grid.m="(0.0,1.0,4.0,1e999)". Variant
flags: runlocal, mesh=<preset>, pod=<layout> (configs/pods).
"""
import ml_collections

from configs import common, pods
from proxykd.data import pipeline, split


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, mesh="fsdp", pod=pods.NONE)
  config = ml_collections.ConfigDict()
  config.stage = "calibrate"
  config.corpus = ""  # Teacher corpus; default <workdir>/collect/corpus.jsonl.
  config.tokenizer = ""  # Default: <workdir>/collect/tokenizer, else <workdir>/tokenizer/hf.
  config.proxy = ""  # A checkpoint or HF dir; default: proxy_dpo's final proxy, else proxy_sft's.
  config.prior = ""  # The prior stage's directory; default <workdir>/prior.
  config.output = ""  # Default <workdir>/calibrate.
  # Which teacher tokens to score: heldout (METHOD.md), or a training split scored with the prior's
  # leave-one-out (e.g. distill: D_s, which the proxy never trained on; for corpora whose held-out
  # slice is too small to calibrate on).
  config.eval_split = "heldout"
  config.max_records = 0  # score at most this many records of eval_split (0: all)
  config.split = split.default_config()  # Must be the split every stage uses.
  config.data = pipeline.default_config()  # seq_len of the scoring rows; length_policy as the prior's
  config.grid = ml_collections.ConfigDict(dict(
      kappa=(1.0, 4.0, 16.0, 64.0),
      m=(0.0, 0.25, 1.0, 4.0, 16.0, 64.0, float("inf")),  # 0: prior only; inf: proxy only
      tau=(0.7, 1.0, 1.5),
      order=(1, 2, 3, 4),  # at most the prior's max_order
      smoothing=("wb", "abs")))  # wb | abs | abs:D
  config.k = 32  # prior top-K per position
  config.floor = 1e-6  # prior floor epsilon
  config.teacher_topk = 20  # teacher top-k slots read from records with logprobs (0: ignore them)
  config.batch_size = 16  # rows per proxy forward (global; divides the mesh's data x fsdp)
  config.loss_chunk = 256  # positions per lm_head chunk (memory: batch x chunk x vocab)
  config.mesh = common.mesh_config(arg.mesh)
  config.plot = True
  config.progress_bar = True
  if arg.runlocal:
    config.data.seq_len = 256
    config.batch_size = 4
  return pods.apply(config, arg.pod, config.stage)
