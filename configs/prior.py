"""Stage `prior`: the corpus n-gram prior over the teacher's response tokens of the training splits.

  python main.py --config=configs/prior.py --workdir=DIR
  python main.py --config=configs/prior.py:order=3 --workdir=DIR

Counts orders 1..max_order over the responses of D_w, D_p and D_s (never the held-out slice),
tokenised with the shared tokenizer exactly as training rows are, and writes DIR/prior/
(counts.npz, meta.json with the tokenizer's fingerprint, summary.json). Rerunning with the same
inputs is a no-op. Variant flags: order=<max n-gram order>.
"""
import ml_collections

from configs import common
from proxykd.data import pipeline, split


def get_config(arg=None):
  arg = common.parse_arg(arg, order=4)
  config = ml_collections.ConfigDict()
  config.stage = "prior"
  config.corpus = ""  # Teacher corpus (JSON lines); default <workdir>/collect/corpus.jsonl.
  config.tokenizer = ""  # Default: <workdir>/collect/tokenizer, else <workdir>/tokenizer/hf.
  config.output = ""  # Default <workdir>/prior.
  config.splits = ("warmup", "align", "distill")  # Counted; the held-out slice never is.
  config.split = split.default_config()  # Must be the split every stage uses.
  # Tokenisation: data.length_policy must match the rows the prior is queried on (checked there).
  config.data = pipeline.default_config()
  config.max_order = arg.order  # Orders 1..max_order are counted (any order <= it can be queried).
  # Query defaults recorded in meta.json (calibrate's chosen.json takes precedence downstream):
  config.order = -1  # -1: max_order
  config.smoothing = "wb"  # wb (Witten-Bell) | abs (absolute discounting, D per order) | abs:D
  config.k = 32  # top-K tokens kept per position (the rest: floor mass spread evenly)
  config.floor = 1e-6  # epsilon: pi = (1 - eps) p_ngram + eps / V
  config.force = False  # Rebuild even when DIR/prior is up to date.
  config.progress_bar = True
  return config
