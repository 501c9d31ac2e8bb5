"""Stage `tokenizer`: train the demo's byte-level BPE tokenizer on the teacher corpus.

  python main.py --config=configs/tokenizer.py --workdir=DIR

Real runs take the proxy's and the student's own tokenizer from their HF directories; this stage
is for models trained from scratch (the built-in demo). It writes <workdir>/tokenizer/hf/, where
the training stages look for a tokenizer when none is configured.
"""
import ml_collections

from configs import common


def get_config(arg=None):
  common.parse_arg(arg)  # No variants: any text after the colon is refused.
  config = ml_collections.ConfigDict()
  config.stage = "tokenizer"
  config.corpus = ""  # Default: <workdir>/collect/corpus.jsonl.
  config.vocab_size = 512  # Must equal the models' vocab_size (the `tiny` preset's is 512).
  return config
