"""Stage `score`: per-token log-probs equal the model's forward (ours from a checkpoint, and
transformers' for the exported HF directory), one output line per input line, in order."""
import json
import math

import jax
import numpy as np
import pytest

from configs import score as score_config
from proxykd.data import tokenize
from proxykd.models import checkpoint, hf_io
from proxykd.models.config import preset
from proxykd.models.tokenizer import load_tokenizer
from proxykd.models.transformer import init_params
from proxykd.errors import UserError
from proxykd.stages import score as score_stage

CFG = preset("tiny", vocab_size=384)
LINES = [
    {"id": "a", "messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Tom has 3 apples and buys 4 more."}],
     "response": "3 + 4 = 7\n#### 7"},
    {"prompt": "What is 12 plus 5?", "response": "12 + 5 = 17\n#### 17", "finish_reason": "length"},
    {"id": "c", "messages": [{"role": "user", "content": "Say nothing."}], "response": ""},
    {"id": "d", "messages": [{"role": "user", "content": "Tom has 30 apples " * 60}],
     "response": "He has many apples.", "meta": {"ignored": True}},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory, demo_tokenizer_dir):
  root = tmp_path_factory.mktemp("models")
  params = init_params(CFG, jax.random.PRNGKey(11))
  checkpoint.save_checkpoint(root / "checkpoints", 5, params,
                             {"model": CFG.to_dict(), "tokenizer": str(demo_tokenizer_dir)})
  hf_io.export_hf(params, CFG, root / "hf", tokenizer_dir=demo_tokenizer_dir, dtype="float32")
  (root / "in.jsonl").write_text("".join(json.dumps(l) + "\n" for l in LINES))
  return root


def _run(model, models, tmp_path, **kw):
  c = score_config.get_config("runlocal")
  c.model, c.input = str(model), str(models / "in.jsonl")
  c.update(kw)
  out = score_stage.run(c, str(tmp_path))
  return [json.loads(l) for l in out.read_text().splitlines()]


def _torch_logprobs(hf_dir, ids):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    logits = model(torch.as_tensor([ids])).logits[0].float()
  return torch.log_softmax(logits, -1).numpy()


def test_score_equals_transformers_and_our_checkpoint(models, tmp_path, demo_tokenizer_dir):
  hf_rows = _run(models / "hf", models, tmp_path / "a")
  ck_rows = _run(models / "checkpoints", models, tmp_path / "b")
  assert [r["line"] for r in hf_rows] == [1, 2, 3, 4]
  assert [r.get("id") for r in hf_rows] == ["a", None, "c", "d"]
  tokenizer = load_tokenizer(demo_tokenizer_dir)
  for i in (0, 1, 2):
    rec = {"messages": LINES[i].get("messages") or [{"role": "user", "content": LINES[i]["prompt"]}],
           "response": LINES[i]["response"], "finish_reason": LINES[i].get("finish_reason", "stop"),
           "id": "x"}
    (ex,), _ = tokenize.tokenize([rec], tokenizer)
    logp = _torch_logprobs(str(models / "hf"), ex.ids.tolist())
    pos = np.nonzero(ex.loss_mask)[0]
    want = logp[pos - 1, ex.ids[pos]]
    for rows in (hf_rows, ck_rows):
      r = rows[i]
      assert r["token_ids"] == ex.ids[pos].tolist()
      np.testing.assert_allclose(r["logprobs"], want, atol=1e-4)
      assert r["sum_logprob"] == pytest.approx(float(np.sum(want)), abs=1e-3)
      assert r["num_tokens"] == len(pos) and r["cut_prompt"] == 0
    # The end-of-turn token is scored unless the response was cut off (finish_reason "length").
    assert (hf_rows[i]["tokens"][-1] == "<|eot_id|>") == (i != 1)
    assert "".join(hf_rows[i]["tokens"]).startswith(LINES[i]["response"])
  assert hf_rows[2]["num_tokens"] == 1  # an empty response: only its end-of-turn token
  # Longer than the row (runlocal: 256): the prompt's start is cut, the whole response is scored.
  assert hf_rows[3]["cut_prompt"] > 0 and hf_rows[3]["cut_response"] == 0
  assert "".join(hf_rows[3]["tokens"]) == LINES[3]["response"] + "<|eot_id|>"
  summary = json.loads((tmp_path / "a" / "score" / "summary.json").read_text())
  tokens = sum(r["num_tokens"] for r in hf_rows)
  assert summary["tokens"] == tokens and summary["lines"] == 4 and summary["cut"] == 1
  assert summary["perplexity"] == pytest.approx(math.exp(-sum(r["sum_logprob"] for r in hf_rows) / tokens))


def test_malformed_score_input_names_file_and_line(models, tmp_path):
  bad = tmp_path / "bad.jsonl"
  for body, match in (('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n', r"bad\.jsonl:2: not valid JSON"),
                      ('\n{"prompt": "a"}\n', r"bad\.jsonl:2: `response` must be a string"),
                      ('{"messages": [{"role": "robot", "content": "x"}], "response": "b"}\n',
                       r"bad\.jsonl:1: `messages` must be")):
    bad.write_text(body)
    c = score_config.get_config("runlocal")
    c.model, c.input = str(models / "hf"), str(bad)
    with pytest.raises(UserError, match=match):
      score_stage.run(c, str(tmp_path))
  c = score_config.get_config()
  c.model = str(models / "hf")
  with pytest.raises(UserError, match="set --config.input"):
    score_stage.run(c, str(tmp_path))
