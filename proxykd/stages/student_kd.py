"""Stage `student_kd`: the student distilled on D_s (METHOD.md stage 3), and its baselines.

Inputs: D_s and the held-out split of the corpus, the tokenizer (it must be the proxy's), the aligned
proxy (online) or DIR/cache_proxy (offline), the prior (DIR/prior) when it has weight, the
calibrated estimator (DIR/calibrate/chosen.json) unless kappa, m and tau are given. Outputs in
DIR/<run_name>/ (student_kd, or student_<baseline>): `weights.jsonl` (record id, l, w) and
`weights.png` (their histogram), checkpoints, metrics (distill/nll, distill/kl,
distill/weight_mean; eval/loss = the held-out NLL of the teacher's tokens), and `hf/`.
Refused before compiling: a proxy whose tokenizer differs from the student's (naming tokens), a
cache made for other rows or another proxy, alpha < 0, a missing calibration without explicit
kappa, m and tau.
"""
from __future__ import annotations

import json
import math

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from proxykd import hosts, runner, workflow
from proxykd.data import proxy_cache, pipeline
from proxykd.estimator import features as prior_features
from proxykd.estimator import store, weights as sample_weights
from proxykd.estimator.prior import PriorView
from proxykd.estimator.teacher_topk import TeacherFeatures
from proxykd.models import checkpoint, hf_io, lora
from proxykd.models.tokenizer import check_same_tokenizer, fingerprint, load_tokenizer
from proxykd.stages import demo_summary, inputs
from proxykd.train import distill, scoring, trainer
from proxykd.train import state as st
from proxykd.train import step as sp
from proxykd.train.sft import build_rows

CALIBRATION_KEYS = ("kappa", "m", "tau")


def estimator_settings(config, workdir) -> dict:
  """kappa, m, tau (and the prior's order, smoothing, floor) from config.kd where set (>= 0),
  the rest from DIR/calibrate/chosen.json; refused when neither gives them."""
  kd = config.kd
  given = {k: float(kd[k]) for k in CALIBRATION_KEYS if kd[k] >= 0}
  if kd.alpha == 0:
    return {"kappa": 0.0, "m": 0.0, "tau": 1.0}
  path = runner.stage_dir(workdir, "calibrate") / "chosen.json"
  chosen = json.loads(path.read_text()) if path.exists() else {}
  missing = [k for k in CALIBRATION_KEYS if k not in given and k not in chosen]
  if missing:
    raise runner.UserError(
        f"no calibration: {path} does not exist and config.kd.{'/'.join(missing)} are not set; "
        "run the calibrate stage or give --config.kd.kappa, --config.kd.m and --config.kd.tau")
  return {**{k: v for k, v in chosen.items() if k not in given}, **given}


def _tokenizer_of(ref: dict) -> str | None:
  if "hf" in ref:
    return ref["hf"]
  return checkpoint.restore_meta(ref["checkpoint"]).get("tokenizer")


def check_tokenizers(student_tok, ref: dict, what: str) -> None:
  """Token-level distillation needs one vocabulary: refuse a proxy trained with another."""
  tok_dir = _tokenizer_of(ref)
  if not tok_dir:
    raise runner.UserError(f"the {what} {ref} records no tokenizer; cannot check it is the student's")
  if fingerprint(load_tokenizer(tok_dir)) != fingerprint(student_tok):
    try:
      check_same_tokenizer(load_tokenizer(tok_dir), student_tok, what, "student")
    except ValueError as e:
      raise runner.UserError(str(e)) from None


def _soft_model_ref(config, workdir) -> dict:
  """The model p̂ comes from: the teacher's own weights (whitebox), the warm-up proxy (unaligned),
  else the aligned proxy."""
  if config.run_name == "student_whitebox":
    if not config.teacher_model:
      raise runner.UserError("baseline=whitebox needs --config.teacher_model=CHECKPOINT_OR_HF_DIR "
                             "(the model behind serve_teacher)")
    return inputs.proxy_ref(_with_proxy(config.teacher_model), workdir)
  if config.run_name == "student_unaligned" and not config.proxy:
    return inputs.proxy_ref(_with_proxy(str(runner.stage_dir(workdir, "proxy_sft") / "checkpoints")),
                            workdir)
  return inputs.proxy_ref(config, workdir)


def _with_proxy(path: str):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({"proxy": path})


def _prior_feature(config, workdir, settings, tokenizer, vocab_size, docs, *, corpus_rows):
  d = epath.Path(config.prior or runner.stage_dir(workdir, "prior"))
  try:
    counts, meta = store.load(d, tokenizer, "the student's tokenizer", config.data.length_policy)
    view = PriorView(counts, order=int(settings.get("order", counts.max_order)),
                     smoothing=settings.get("smoothing", "wb"), k=config.kd.prior_k,
                     vocab_size=vocab_size, floor=float(settings.get("floor", 1e-6)))
    return prior_features.PriorFeature(view, docs, corpus_rows=corpus_rows)
  except (FileNotFoundError, ValueError) as e:
    raise runner.UserError(f"config.prior: {e}") from None


def _write_weights(out: epath.Path, w: sample_weights.SampleWeights) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / "weights.jsonl").write_text("".join(
      json.dumps({"id": i, "mean_logp": float(l), "w": float(x)}) + "\n"
      for i, l, x in zip(w.ids, w.mean_logp, w.weights)))
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3))
  ax.hist(w.weights, bins=30, range=(0, 1))
  ax.set(xlabel="sample weight w = sigmoid((l - mu) / s)", ylabel="records",
         title=f"mu={w.mu:.3f} s={w.s:.3f} over {len(w.ids)} records")
  fig.tight_layout()
  with (out / "weights.png").open("wb") as f:
    fig.savefig(f, dpi=100)
  plt.close(fig)


def run_pipeline(config, workdir):
  """The demo end to end (configs/student_kd.py `demo_pipeline`): every upstream stage not done
  yet, this student, its SFT baseline (same initialisation and token budget), the evaluation of
  both, the comparison table; each step skipped when done (proxykd/workflow.py)."""
  p = config.pipeline
  steps = [workflow.Step(name, p.steps[name]) for name in p.order]
  student = config.copy_and_resolve_references()
  student.pipeline = ml_collections.ConfigDict({"enabled": False})
  baseline = student.copy_and_resolve_references()
  baseline.update(run_name=f"student_{p.baseline}")
  if p.baseline != "sft":
    raise runner.UserError(f"config.pipeline.baseline={p.baseline!r}: the demo compares with sft")
  baseline.kd.alpha = 0.0
  runs = [student.run_name, baseline.run_name]
  steps += [workflow.Step(student.run_name, student), workflow.Step(baseline.run_name, baseline)]
  for name in runs:
    evaluation = p.eval.copy_and_resolve_references()
    evaluation.update(model=str(runner.stage_dir(workdir, name) / "checkpoints"), name=name,
                      output=str(runner.stage_dir(workdir, name) / "eval"))
    with evaluation.unlocked():
      evaluation.run_name = f"{name}/eval"  # its config.json beside its results
    steps.append(workflow.Step(f"{name}/eval", evaluation))
  steps.append(workflow.Step("summary", None, action=lambda: demo_summary.write(workdir, runs)))
  workflow.run(steps, workdir, p.rerun)
  return runner.stage_dir(workdir, "summary")


def run(config, workdir):
  if config.get("pipeline") is not None and config.pipeline.enabled:
    return run_pipeline(config, workdir)
  out = runner.stage_dir(workdir, config.run_name)
  kd = config.kd
  if kd.alpha < 0:
    raise runner.UserError(f"config.kd.alpha={kd.alpha} must be >= 0")
  if kd.mode not in ("online", "offline"):
    raise runner.UserError(f"config.kd.mode={kd.mode!r}: choose online or offline")
  settings = estimator_settings(config, workdir)
  tok_dir = inputs.tokenizer_dir(config, workdir)
  tokenizer = load_tokenizer(tok_dir)
  records, heldout, corpus_path = inputs.load_split(config, workdir)
  ref = trainer.weights_ref(config)
  cfg = trainer.model_config(config, ref)
  if len(tokenizer) > cfg.vocab_size:
    raise runner.UserError(f"the tokenizer has {len(tokenizer)} tokens but the student's vocab_size "
                           f"is {cfg.vocab_size}")
  soft_ref = _soft_model_ref(config, workdir) if kd.alpha > 0 else None
  if soft_ref is not None:
    check_tokenizers(tokenizer, soft_ref, "whitebox teacher" if config.run_name == "student_whitebox"
                     else "proxy")
  proxy_cfg = None
  models = {"model": cfg}
  if kd.alpha > 0 and kd.mode == "online":  # the proxy runs inside the step
    proxy_cfg = inputs.inference_config(soft_ref)
    if proxy_cfg.vocab_size != cfg.vocab_size:
      raise runner.UserError(f"the proxy's vocabulary ({proxy_cfg.vocab_size}) is not the "
                             f"student's ({cfg.vocab_size})")
    models["proxy"] = proxy_cfg
  mesh = trainer.make_mesh(config, models)

  teacher = None
  if (kd.alpha > 0 and kd.teacher_topk > 0 and config.run_name != "student_whitebox"
      and any(r.get("logprobs") for r in records)):
    teacher = TeacherFeatures(records, tokenizer, kd.teacher_topk, config.data.length_policy)
  rows, stats = build_rows(records, tokenizer, config, out, "train", shuffle=True, transform=teacher)
  if teacher is not None and teacher.coverage.records:  # (rows from the cache were not re-made)
    logging.info("teacher top-k: %s", teacher.coverage.to_dict())
  eval_rows = build_rows(heldout, tokenizer, config, out, "heldout", shuffle=False)[0] \
      if heldout else None
  use_prior = kd.alpha > 0 and settings["kappa"] > 0 and not math.isinf(settings["m"])
  features, frozen, frozen_spec = [], {}, {}
  if use_prior:
    features.append(_prior_feature(config, workdir, settings, tokenizer, cfg.vocab_size, rows.docs,
                                   corpus_rows=True))
  proxy_params = None
  if proxy_cfg is not None:
    proxy_params, _ = inputs.model_for_inference(soft_ref, trainer.shardings_for(mesh))
    frozen[distill.PROXY] = proxy_params
    frozen_spec[distill.PROXY] = st.model_spec(proxy_cfg, mesh)
  if kd.mode == "offline" and kd.alpha > 0:
    cache_dir = epath.Path(config.cache or runner.stage_dir(workdir, "cache_proxy"))
    expected = {**pipeline.fingerprint_of_rows(tokenizer, config.data),
                "proxy": checkpoint.weights_identity(soft_ref), "tau": float(settings["tau"])}
    try:
      cache = proxy_cache.ProxyCache(cache_dir, expected)
    except (FileNotFoundError, ValueError) as e:
      raise runner.UserError(f"config.cache: {e}") from None
    features.append(proxy_cache.CacheFeature(cache, rows.docs))

  # Sample weights (Eq. 9): one scoring pass of the proxy over D_s (offline: the cache's record
  # means); carried per token, no gradient.
  w_by_id = {}
  if kd.weighted and kd.alpha > 0:
    if proxy_params is not None:
      scores = scoring.Scorer(proxy_cfg, mesh, config.train.batch_size, config.data.seq_len,
                              config.train.loss_chunk)(proxy_params, rows)
      ids, means = sample_weights.per_record_mean_logp(scores["logp"], rows.arrays["loss_mask"],
                                                       rows.arrays["doc"], rows.docs)
    else:
      ids, means = cache.record_mean_logp()
    w = sample_weights.sample_weights(ids, means)
    if hosts.is_main():
      _write_weights(out, w)
    w_by_id = w.by_id()
    logging.info("sample weights: mu=%.4f s=%.4f over %d records (%s)", w.mu, w.s, len(ids),
                 out / "weights.jsonl")
  rows.arrays["weight"] = sample_weights.token_weights(w_by_id, rows.arrays["doc"], rows.docs)

  s = distill.KDSettings(alpha=kd.alpha, divergence=kd.divergence,
                         div_param=kd.div_param if kd.div_param >= 0 else None, mode=kd.mode,
                         kappa=settings["kappa"], m=settings["m"], tau=settings["tau"],
                         use_prior=use_prior, use_teacher=teacher is not None,
                         chunk_len=config.train.loss_chunk)
  try:
    loss = distill.kd_loss(cfg, s, proxy_cfg)
  except ValueError as e:
    raise runner.UserError(str(e)) from None
  meta = {"stage": "student_kd", "run_name": config.run_name, "corpus": str(corpus_path),
          "tokenizer": str(tok_dir), "tokenizer_fingerprint": fingerprint(tokenizer),
          "truncation": stats.to_dict(), "estimator": settings, "soft_model": soft_ref,
          "kd": kd.to_dict()}
  logging.info("%s: alpha=%g, %s, kappa=%g m=%g tau=%g, prior %s, %s", config.run_name, kd.alpha,
               kd.mode, settings["kappa"], settings["m"], settings["tau"],
               "on" if use_prior else "off", "weighted" if w_by_id else "unweighted")
  result = trainer.fit(config, out, cfg, mesh, loss, rows, eval_rows, meta, ref, frozen=frozen,
                       frozen_spec=frozen_spec, features=features,
                       eval_loss=sp.sft_loss(cfg, config.train.loss_chunk))
  if config.export:
    params, export_cfg = result.params, cfg
    if cfg.lora_rank:
      params, export_cfg = lora.merge(params, cfg)
    hf_io.export_hf(params, export_cfg, out / "hf", tokenizer_dir=tok_dir, dtype=config.export_dtype)
    logging.info("%s: exported %s", config.run_name, out / "hf")
  return out
