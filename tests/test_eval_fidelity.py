"""Estimator fidelity against a teacher whose weights we have: the stage's KL(T || .) and top-1 for
the prior, the proxy, the posterior and a student equal a NumPy computation position by position."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import eval as eval_config
from proxykd.data import corpus, split, tokenize
from proxykd.estimator import build
from proxykd.estimator.prior import PriorView
from proxykd.models import checkpoint
from proxykd.models.config import preset
from proxykd.models.sampling import Sampler
from proxykd.models.tokenizer import end_of_turn_ids, load_tokenizer
from proxykd.models.transformer import Transformer, init_params, lm_head_kernel
from proxykd.errors import UserError
from proxykd.stages import eval as eval_stage
from proxykd.data import problems
from sft_fixtures import write_corpus

CFG = preset("tiny", vocab_size=384)
TEMPERATURE = 0.8
SETTING = dict(kappa=2.0, m=3.0, tau=TEMPERATURE, order=2, smoothing="wb", k=8, floor=1e-3)


@pytest.fixture(scope="module")
def world(tmp_path_factory, demo_tokenizer_dir):
  """A teacher (random tiny model), the corpus it sampled at TEMPERATURE, a student."""
  root = tmp_path_factory.mktemp("fidelity")
  tokenizer = load_tokenizer(demo_tokenizer_dir)
  teacher, student = init_params(CFG, jax.random.PRNGKey(1)), init_params(CFG, jax.random.PRNGKey(2))
  meta = {"model": CFG.to_dict(), "tokenizer": str(demo_tokenizer_dir)}
  checkpoint.save_checkpoint(root / "teacher", 1, teacher, meta)
  checkpoint.save_checkpoint(root / "student", 1, student, meta)
  qs = [p.question for p in problems.generate(48, "train", seed=9)]
  params = {"model": "teacher", "temperature": TEMPERATURE, "top_p": 1.0}
  prompts = [[{"role": "user", "content": q}] for q in qs]
  ids = [tokenizer(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"] for m in prompts]
  gens = Sampler(CFG, min_batch=16).generate(teacher, ids, max_new_tokens=10, temperature=TEMPERATURE,
                                             seed=3, eos_ids=end_of_turn_ids(tokenizer))
  records = []
  for m, g in zip(prompts, gens):
    text = tokenizer.decode([t for t in g.tokens if t not in end_of_turn_ids(tokenizer)],
                            skip_special_tokens=True)
    records.append({"id": corpus.record_id(m, params, 0), "messages": m, "response": text or "x",
                    "sample_index": 0, "teacher": params, "finish_reason": g.finish_reason,
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
  wd = root / "wd"
  write_corpus(wd / "collect" / "corpus.jsonl", records)
  return {"root": root, "wd": wd, "tokenizer": tokenizer, "teacher": teacher, "student": student,
          "records": records}


def _config(world, **fid):
  c = eval_config.get_config("runlocal,tasks=fidelity")
  c.model = str(world["root"] / "student")
  c.progress = False
  c.split.heldout = 0.3
  c.data.seq_len = 256  # no record is cut (the reference reads each one whole)
  c.loss_chunk = 32
  c.fidelity.update({"teacher_model": str(world["root"] / "teacher"), "proxy": str(world["root"] / "teacher"),
                     **SETTING, **fid})
  return c


def _reference(world, c):
  """KL and top-1 per estimate, in NumPy over every held-out response position."""
  parts = split.split_records(world["records"], c.split)
  tok = world["tokenizer"]
  counts = build.counts_from_records(parts["distill"], tok, SETTING["order"])
  view = PriorView(counts, order=SETTING["order"], smoothing="wb", k=SETTING["k"],
                   vocab_size=CFG.vocab_size, floor=SETTING["floor"])
  model = Transformer(CFG)

  @jax.jit
  def logits(params, ids):
    h = model.apply({"params": params}, ids, jnp.arange(ids.shape[1])[None], jnp.ones_like(ids),
                    return_hidden=True)
    return h[0] @ lm_head_kernel(params, CFG)

  log_softmax = lambda z: z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
  sums = {k: [0.0, 0] for k in ("prior", "proxy", "posterior", "posterior_no_label", "student")}
  n = 0
  entropy = 0.0
  for ex in tokenize.tokenize(parts["heldout"], tok)[0]:
    ids = jnp.asarray(ex.ids[None])
    zt = np.asarray(logits(world["teacher"], ids), np.float64)
    zs = np.asarray(logits(world["student"], ids), np.float64)
    pos = np.nonzero(ex.loss_mask)[0]
    pos = pos[pos > 0]
    first = int(np.argmax(ex.loss_mask))
    hist = np.asarray([[ex.ids[j - 1] if j - 1 >= first else counts.num_ids] for j in pos])
    sparse = view.query(hist, ex.ids[pos])  # pi: its top-K exactly, `rest` for every other token
    pi = np.repeat(np.asarray(sparse.rest, np.float64)[:, None], CFG.vocab_size, axis=1)
    np.put_along_axis(pi, np.asarray(sparse.ids), np.asarray(sparse.probs, np.float64), axis=1)
    log_t = log_softmax(zt[pos - 1] / TEMPERATURE)
    q = np.exp(log_softmax(zt[pos - 1] / SETTING["tau"]))
    e = np.eye(CFG.vocab_size)[ex.ids[pos]]
    kap, m = SETTING["kappa"], SETTING["m"]
    est = {"prior": pi, "proxy": q, "posterior": (kap * pi + e + m * q) / (kap + 1 + m),
           "posterior_no_label": (kap * pi + m * q) / (kap + m),
           "student": np.exp(log_softmax(zs[pos - 1]))}
    t = np.exp(log_t)
    for k, p in est.items():
      sums[k][0] += float(np.sum(t * (log_t - np.log(p))))
      sums[k][1] += int(np.sum(np.argmax(p, -1) == np.argmax(t, -1)))
    entropy += float(-np.sum(t * log_t))
    n += len(pos)
  return {k: (v[0] / n, v[1] / n) for k, v in sums.items()}, entropy / n, n


def test_fidelity_equals_numpy_and_the_proxy_that_is_the_teacher_is_exact(world, tmp_path):
  c = _config(world)
  eval_stage.run(c, str(world["wd"]))
  res = json.loads((world["wd"] / "eval" / "results.json").read_text())["tasks"]["fidelity"]
  want, entropy, n = _reference(world, c)
  assert res["tokens"] == n and n > 20
  assert res["teacher_sampling"] == {"temperature": TEMPERATURE, "top_p": 1.0}
  for k, (kl, top1) in want.items():
    assert res["estimates"][k]["kl"] == pytest.approx(kl, abs=2e-4, rel=1e-4), k
    assert res["estimates"][k]["top1"] == pytest.approx(top1, abs=1e-9), k
  assert res["teacher_entropy"] == pytest.approx(entropy, rel=1e-4)
  # The proxy is the teacher, at the teacher's temperature: it is exact, and the posterior, which
  # mixes in the prior and the one-hot label, is not.
  assert res["estimates"]["proxy"]["kl"] == pytest.approx(0.0, abs=1e-5)
  assert res["estimates"]["proxy"]["top1"] == 1.0
  assert res["estimates"]["posterior"]["kl"] > 0.01
  md = (world["wd"] / "eval" / "results.md").read_text()
  assert "KL(teacher ‖ posterior)" in md


def test_fidelity_refusals(world, tmp_path):
  with pytest.raises(UserError, match=r"config.fidelity.teacher_model=.*no such file"):
    eval_stage.run(_config(world, teacher_model=str(tmp_path / "none")), str(world["wd"]))
  # A prior that counted the held-out records too is refused (they would not be held out).
  c = _config(world, prior_split="heldout")
  with pytest.raises(UserError, match="were counted in the prior"):
    eval_stage.run(c, str(world["wd"]))
