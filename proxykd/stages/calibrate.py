"""Stage `calibrate`: empirical-Bayes calibration of the estimator on held-out teacher tokens.

Inputs: the corpus and its split, the shared tokenizer, the prior (`<workdir>/prior`), the aligned
proxy (proxykd/stages/inputs.py `proxy_ref`). The proxy runs once over the scored rows (jitted on
the mesh, chunked lm_head) and yields log q_tau(y) for every tau of the grid; the prior yields
log pi(y) for every order and smoothing; each setting's score is their mixture without the label
(proxykd/estimator/calibration.py, which also explains how the scale kappa + m is chosen).

Outputs in `<workdir>/calibrate/`: `table.json` (every setting's nats/token, the best prior-only,
proxy-only and posterior settings, the teacher's own score and the top-k coverage when the records
carry logprobs), `chosen.json` (the setting the distillation stages use by default), and
`calibration.png` (nats/token against m for each kappa). Cheap to rerun: one forward pass.
"""
from __future__ import annotations

import json
import math

import jax
import numpy as np
from absl import logging
from etils import epath

from proxykd import runner
from proxykd.data import pipeline, split
from proxykd.estimator import calibration as cal
from proxykd.estimator import store
from proxykd.estimator.features import PriorFeature
from proxykd.estimator.prior import PriorView, Smoothing
from proxykd.estimator.teacher_topk import TeacherFeatures
from proxykd.models import checkpoint
from proxykd.models.tokenizer import check_same_tokenizer, load_tokenizer
from proxykd.stages import inputs
from proxykd.train import scoring, trainer
from proxykd.train import sharding as shd

STAGE = "calibrate"
ROWS_PER_BLOCK = 64  # rows scored (and prior-queried) per progress step


def _grid(config, max_order: int) -> list[cal.Setting]:
  g = config.grid
  try:
    smoothings = [str(Smoothing.parse(s)) for s in g.smoothing]
    values = {k: [float(x) for x in g[k]] for k in ("kappa", "m", "tau")}
  except ValueError as e:
    raise runner.UserError(f"config.grid: {e}") from None
  if any(t <= 0 for t in values["tau"]) or any(x < 0 for x in values["kappa"] + values["m"]) or \
      any(math.isinf(k) for k in values["kappa"]):
    raise runner.UserError("config.grid: tau must be > 0, kappa finite and >= 0, m >= 0 (inf allowed)")
  bad = [o for o in g.order if not 1 <= int(o) <= max_order]
  if bad:
    raise runner.UserError(f"config.grid.order={tuple(g.order)}: the prior was counted up to order "
                           f"{max_order}")
  settings = cal.grid(g.order, smoothings, values["tau"], values["kappa"], values["m"])
  if not settings:
    raise runner.UserError("config.grid: no setting (each of kappa, m, tau, order, smoothing needs "
                           "a value, and kappa = m = 0 alone has nothing to mix)")
  return settings


def _records(config, workdir):
  parts, corpus = inputs.corpus_splits(config, workdir)
  name = config.eval_split
  if name not in (split.HELDOUT, *split.SPLITS):
    raise runner.UserError(f"config.eval_split={name!r}: choose heldout or one of {split.SPLITS}")
  records = parts[name][:config.max_records or None]
  if not records:
    raise runner.UserError(f"{corpus}: the {name} split is empty; raise config.split.{name} (for "
                           "every stage) or calibrate on a split the proxy never trained on, "
                           "--config.eval_split=distill")
  return records, corpus, name != split.HELDOUT


def _load_proxy(config, workdir, tokenizer, mesh):
  ref = inputs.proxy_ref(config, workdir)
  params, cfg = inputs.model_for_inference(ref, trainer.shardings_for(mesh))
  if len(tokenizer) > cfg.vocab_size:
    raise runner.UserError(f"the tokenizer has {len(tokenizer)} tokens, more than the proxy's "
                           f"vocabulary ({cfg.vocab_size}); proxy {ref}")
  own = ref.get("hf") or (checkpoint.restore_meta(ref["checkpoint"]).get("tokenizer")
                          if "checkpoint" in ref else None)
  if own and (epath.Path(own) / "tokenizer_config.json").exists():
    try:
      check_same_tokenizer(load_tokenizer(own), tokenizer, "proxy", "configured")
    except ValueError as e:
      raise runner.UserError(f"proxy {ref}: {e}") from None
  return params, cfg, ref


def _prior_at(view: PriorView, rows, corpus_rows: bool, valid: np.ndarray,
              teacher_ids: np.ndarray | None):
  """log pi(y) [n] and log pi at the teacher's ids [n, kt] at the valid slots, block by block."""
  feature = PriorFeature(view, rows.docs, corpus_rows=corpus_rows)
  at_y, at_t = [], []
  for lo in range(0, len(rows), ROWS_PER_BLOCK):
    block = {k: v[lo:lo + ROWS_PER_BLOCK] for k, v in rows.arrays.items()}
    f = feature(block)
    ok = valid[lo:lo + ROWS_PER_BLOCK]
    ids, probs, rest = f["prior_ids"][ok], f["prior_probs"][ok], f["prior_rest"][ok]

    def lookup(tokens):
      hit = ids[:, None, :] == tokens[..., None]
      return np.log(np.where(hit.any(-1), np.sum(np.where(hit, probs[:, None, :], 0.0), -1),
                             rest[:, None]).astype(np.float64))

    at_y.append(lookup(block["targets"][ok][:, None])[:, 0])
    if teacher_ids is not None:
      at_t.append(lookup(block["teacher_ids"][ok]))
  return np.concatenate(at_y), (np.concatenate(at_t) if teacher_ids is not None else None)


def _teacher_reference(records, rows, valid) -> dict:
  """The teacher's own nats per (our) token: its reported log-probability of each whole response
  (tokenizer-independent) over our response tokens of those records."""
  with_lp = [r for r in records if r.get("logprobs")]
  if not with_lp:
    return {}
  ids = {r["id"] for r in with_lp}
  doc_has = np.array([d in ids for d in rows.docs] + [False])
  tokens = int((valid & doc_has[rows.arrays["doc"]]).sum())
  total = -sum(t["logprob"] for r in with_lp for t in r["logprobs"])
  return {"teacher_reported_nats_per_token": total / max(tokens, 1), "teacher_records": len(with_lp)}


def _proxy_scores(config, cfg, mesh, params, rows, taus, kt) -> dict[str, np.ndarray]:
  """One forward of the proxy over all rows: log q_tau at the targets (and the teacher's ids)."""
  scorer = scoring.Scorer(cfg, mesh, config.batch_size, config.data.seq_len, config.loss_chunk,
                          stats=cal.proxy_stats(taus, config.loss_chunk, kt),
                          features={"teacher_ids": ((kt,), np.int32)} if kt else None)
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  blocks = [scorer(params, rows, lo, lo + ROWS_PER_BLOCK)
            for lo in tqdm(range(0, len(rows), ROWS_PER_BLOCK), desc=f"{STAGE}: proxy", unit="block",
                           disable=not config.progress_bar, dynamic_ncols=True)]
  return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def _prior_scores(config, counts, vocab_size, variants, rows, corpus_rows, valid, t_ids):
  """log pi(y) (and log pi at the teacher's ids) for every (order, smoothing) of the grid."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  at_y, at_t = {}, {}
  for order, sm in tqdm(variants, desc=f"{STAGE}: prior", unit="variant",
                        disable=not config.progress_bar, dynamic_ncols=True):
    view = PriorView(counts, order=order, smoothing=sm, k=config.k, vocab_size=vocab_size,
                     floor=config.floor)
    try:
      at_y[(order, sm)], at_t[(order, sm)] = _prior_at(view, rows, corpus_rows, valid, t_ids)
    except ValueError as e:
      raise runner.UserError(f"{STAGE}: {e} (is config.split the prior's?)") from None
  return at_y, at_t


def _teacher_outputs(teacher, records, rows, valid, evidence, log_pi_y, log_q_y, c) -> dict:
  """Coverage, the teacher's own score, and the chosen setting's score with the override."""
  info = {"coverage": teacher.coverage.to_dict(), **_teacher_reference(records, rows, valid)}
  if evidence is not None:
    at_y = np.asarray(cal.posterior.label_logprob(log_pi_y[(c.order, c.smoothing)],
                                                  log_q_y[c.tau], c.kappa, c.m, False), np.float64)
    covered = rows.arrays["teacher_ids"][valid][:, 0] >= 0
    at_y[covered] = cal.override_logprob(evidence, at_y[covered], c)
    info["chosen_with_teacher_topk_nats_per_token"] = float(-at_y.mean())
  return info


def run(config, workdir):
  out = epath.Path(config.output or runner.stage_dir(workdir, STAGE))
  out.mkdir(parents=True, exist_ok=True)
  tok_dir = inputs.tokenizer_dir(config, workdir)
  tokenizer = load_tokenizer(tok_dir)
  prior_dir = epath.Path(runner.absolute_path(config.prior) if config.prior else
                         runner.stage_dir(workdir, "prior"))
  try:
    counts, prior_meta = store.load(prior_dir, tokenizer, str(tok_dir), config.data.length_policy)
  except (FileNotFoundError, ValueError) as e:
    raise runner.UserError(str(e)) from None
  settings = _grid(config, counts.max_order)
  records, corpus, corpus_rows = _records(config, workdir)
  teacher = None
  if config.teacher_topk > 0 and any(r.get("logprobs") for r in records):
    teacher = TeacherFeatures(records, tokenizer, config.teacher_topk, config.data.length_policy)
  try:
    rows, _ = pipeline.build_rows(records, tokenizer, config.data, shuffle=False,
                                  transform=teacher, transform_key=teacher.key if teacher else "")
    mesh = shd.mesh_from_config(config.mesh)
  except ValueError as e:
    raise runner.UserError(str(e)) from None
  params, cfg, ref = _load_proxy(config, workdir, tokenizer, mesh)
  try:
    shd.validate_mesh(mesh, {"proxy": cfg}, config.batch_size)
  except ValueError as e:
    raise runner.UserError(str(e).replace("config.train.batch_size", "config.batch_size")) from None

  taus = sorted({s.tau for s in settings})
  kt = config.teacher_topk if teacher else 0
  scores = _proxy_scores(config, cfg, mesh, params, rows, taus, kt)
  valid = rows.arrays["loss_mask"] > 0
  log_q_y = {tau: scores["logq"][..., j][valid].astype(np.float64) for j, tau in enumerate(taus)}
  t_ids = rows.arrays["teacher_ids"] if kt else None
  log_pi_y, log_pi_t = _prior_scores(config, counts, cfg.vocab_size,
                                     sorted({(s.order, s.smoothing) for s in settings}), rows,
                                     corpus_rows, valid, t_ids)
  nats = cal.score_grid(settings, log_pi_y, log_q_y)

  evidence = None
  if kt and (t_ids[valid][:, 0] >= 0).any():
    covered = t_ids[valid][:, 0] >= 0
    evidence = cal.TeacherEvidence(
        t_ids[valid][covered], rows.arrays["teacher_logp"][valid][covered],
        rows.arrays["targets"][valid][covered], {v: x[covered] for v, x in log_pi_t.items()},
        {tau: scores["logq_teacher"][..., j, :][valid][covered].astype(np.float64)
         for j, tau in enumerate(taus)})
  chosen, how = cal.choose(settings, nats, evidence)
  c = settings[chosen]
  families = {"prior only": cal.best_of(settings, nats, "prior"),
              "proxy only": cal.best_of(settings, nats, "proxy"),
              "posterior": cal.best_of(settings, nats, "posterior")}
  teacher_info = (_teacher_outputs(teacher, records, rows, valid, evidence, log_pi_y, log_q_y, c)
                  if teacher else {})
  extra = {name: teacher_info[key] for name, key in (
      ("teacher (own)", "teacher_reported_nats_per_token"),
      ("chosen+teacher", "chosen_with_teacher_topk_nats_per_token")) if key in teacher_info}

  n_tokens = int(valid.sum())
  row = lambda i: {**settings[i].to_dict(), "nats_per_token": float(nats[i])}  # noqa: E731
  table = {
      "eval_split": config.eval_split, "leave_one_out": corpus_rows, "records": len(records),
      "tokens": n_tokens, "corpus": str(corpus), "prior": str(prior_dir), "proxy": ref,
      "settings": [row(i) for i in range(len(settings))],
      "best": {name: (row(i) if i is not None else None) for name, i in families.items()},
      "chosen": {**row(chosen), **how}, "teacher": teacher_info,
  }
  best = {k: (float(nats[i]) if i is not None else None) for k, i in families.items()}
  chosen_json = {"kappa": c.kappa, "m": cal.json_number(c.m), "tau": c.tau, "order": c.order,
                 "smoothing": c.smoothing, "k": config.k, "floor": config.floor,
                 "nats_per_token": float(nats[chosen]), "prior_only_nats_per_token": best["prior only"],
                 "proxy_only_nats_per_token": best["proxy only"], "rule": how["rule"],
                 "tokens": n_tokens, "eval_split": config.eval_split, "prior": str(prior_dir),
                 "prior_tokens": prior_meta.get("tokens"), "proxy": ref}
  if jax.process_index() == 0:  # every host computed the same numbers; one writes them
    (out / "table.json").write_text(json.dumps(table, indent=2))
    (out / "chosen.json").write_text(json.dumps(chosen_json, indent=2))
    if config.plot:
      cal.plot(settings, nats, chosen, out / "calibration.png")
  text = cal.format_table(settings, nats, chosen, families, extra)
  if teacher:
    cov = teacher.coverage.to_dict()
    text += (f"\nteacher top-k: {cov['with_candidates']}/{cov['response_tokens']} response tokens "
             f"covered ({cov['with_candidates_fraction']:.1%}); {cov['mapped']}/{cov['candidates']} "
             f"candidates map to single tokens ({cov['mapped_candidate_fraction']:.1%})")
  loo = ", leave-one-out" if corpus_rows else ""
  text += f"\n({n_tokens} tokens of {len(records)} {config.eval_split} records{loo})"
  logging.info("%s: chosen by %s (%.4f nats/token); wrote %s", STAGE, chosen_json["rule"],
               chosen_json["nats_per_token"], out)
  print(text)
  return out
