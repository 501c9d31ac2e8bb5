"""Stage `cache_proxy`: the proxy's top-k per response position of D_s, for offline distillation.

  python main.py --config=configs/cache_proxy.py --workdir=DIR          # after proxy_dpo
  python main.py --config=configs/cache_proxy.py:runlocal --workdir=DIR

Writes DIR/cache_proxy/ (sharded, resumable, fingerprinted); student_kd with kd.mode=offline reads
it and never loads the proxy. Variant flags: runlocal, mesh=<preset>, pod=<layout> (configs/pods).
"""
import ml_collections

from configs import common, pods
from proxykd.data import pipeline, split


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, mesh="fsdp", pod=pods.NONE)
  config = ml_collections.ConfigDict()
  config.stage = "cache_proxy"
  config.corpus = ""  # default <workdir>/collect/corpus.jsonl
  config.split_name = "distill"  # D_s
  config.tokenizer = ""  # default: as proxy_sft
  config.proxy = ""  # a checkpoint or HF dir; default: proxy_dpo's final proxy, else proxy_sft's
  config.output = ""  # default <workdir>/cache_proxy
  config.k = 32  # top-k per position (paper: 10)
  config.tau = -1.0  # proxy temperature; < 0: calibrate's chosen tau (DIR/calibrate/chosen.json), else 1
  config.rows_per_shard = 256  # packed rows per shard file
  config.batch_size = 16  # rows per forward
  config.loss_chunk = 256  # positions per lm_head chunk (memory: batch x chunk x vocab)
  config.verify_rows = 8  # rows re-computed and checked against the cache at the end (0: none)
  config.seed = 0  # which rows the verifier picks
  config.mesh = common.mesh_config(arg.mesh)
  config.split = split.default_config()
  config.data = pipeline.default_config()  # must match the student_kd run that reads the cache
  config.progress_bar = True
  if arg.runlocal:
    config.data.seq_len = 256
    config.update(batch_size=4, rows_per_shard=16, k=16)
  return pods.apply(config, arg.pod, config.stage)
