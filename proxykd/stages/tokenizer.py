"""Stage `tokenizer`: a BPE tokenizer (with chat template) trained on the teacher corpus."""
from __future__ import annotations

from absl import logging
from etils import epath

from proxykd import paths, runner
from proxykd.data import corpus
from proxykd.models.tokenizer import build_demo_tokenizer

STAGE = "tokenizer"


def output_dir(workdir) -> epath.Path:
  return runner.stage_dir(workdir, STAGE) / "hf"


def run(config, workdir):
  path = epath.Path(config.corpus or runner.stage_dir(workdir, "collect") / corpus.CORPUS_FILENAME)
  if not path.exists():
    raise runner.UserError(f"tokenizer: corpus {path} does not exist; run the collect stage or "
                           "set --config.corpus=PATH")
  texts = []
  for record in corpus.read_corpus(path):
    texts.extend(m["content"] for m in record["messages"] if isinstance(m.get("content"), str))
    texts.append(record["response"])
  out = output_dir(workdir)
  with paths.LocalMirror(out, prefix="proxykd-tokenizer-") as staged:  # Built locally, then copied.
    tokenizer = build_demo_tokenizer(staged.local, texts, vocab_size=config.vocab_size)
  if len(tokenizer) > config.vocab_size:
    raise runner.UserError(f"tokenizer: {len(tokenizer)} tokens exceed vocab_size={config.vocab_size}")
  logging.info("tokenizer: %d tokens from %d texts of %s -> %s", len(tokenizer), len(texts), path, out)
  print(f"tokenizer: {len(tokenizer)} tokens -> {out}")
  return out
