"""Stage `score`: per-token and per-sequence log-likelihood of (messages, response) JSON lines
under one of our checkpoints or a Hugging Face model directory.

  python main.py --config=configs/score.py --config.model=CHECKPOINT_OR_HF_DIR \
      --config.input=texts.jsonl --workdir=DIR

Each input line has `messages` (a chat list; or `prompt`, a string) and `response`. Writes
DIR/score/scores.jsonl (or --config.output): one line per input line, in order, with each response
token's text, id and log-probability and the sequence's sum; DIR/score/summary.json: tokens, NLL
per token, perplexity. Variant flags: runlocal (a short row length), mesh=<preset>.
"""
import ml_collections

from configs import common
from proxykd.data import pipeline


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, mesh="fsdp")
  c = ml_collections.ConfigDict()
  c.stage = "score"
  c.model = ""  # One of our checkpoints (root or step) or a Hugging Face model directory.
  c.tokenizer = ""  # Default: the HF directory, or the tokenizer the checkpoint records.
  c.dtype = ""  # Compute dtype override (float32 | bfloat16); default: the model's (auto).
  c.input = ""  # JSONL of {messages | prompt, response}; a teacher corpus works as it is.
  c.output = ""  # Default <workdir>/score/scores.jsonl.
  c.batch_size = 8  # Rows of data.seq_len tokens per scoring call.
  c.loss_chunk = 256  # Positions per lm_head chunk (memory: rows x chunk x vocab).
  c.mesh = common.mesh_config(arg.mesh)
  # Tokenisation as in training. A conversation longer than seq_len + 1 tokens loses the start
  # of its prompt first (truncate_prompt), then the end of its response; the output says how many.
  c.data = pipeline.default_config()
  c.data.update(seq_len=2048, truncation="truncate_prompt", cache=False)
  if arg.runlocal:
    c.data.seq_len = 256
    c.batch_size = 4
  return c
