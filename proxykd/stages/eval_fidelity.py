"""The eval stage's `fidelity` task: its inputs (teacher, proxy, prior, calibrated setting) and the
jitted pass over the held-out rows (the measure itself is proxykd/eval/fidelity.py).

Inputs: `config.fidelity.teacher_model` (the black box's own weights: the model serve_teacher served),
the aligned proxy (`config.fidelity.proxy`, else the workdir's), the prior (the calibrated one's
directory, `config.fidelity.prior`, `<workdir>/prior`, else counted here on `prior_split`), the
setting (kappa, m, tau, order, smoothing, k, floor) from `<workdir>/calibrate/chosen.json` when it
exists, and the evaluated model as the student.
"""
from __future__ import annotations

import json

import jax
from absl import logging
from etils import epath

from proxykd import runner
from proxykd.data import batches, pipeline
from proxykd.estimator import build, store
from proxykd.estimator.features import KEYS as PRIOR_KEYS, PriorFeature
from proxykd.estimator.prior import PriorView
from proxykd.eval import fidelity, model as eval_model
from proxykd.models.tokenizer import check_same_tokenizer, load_tokenizer
from proxykd.stages import inputs
from proxykd.train import trainer
from proxykd.train import sharding as shd

SETTING_KEYS = ("kappa", "m", "tau", "order", "smoothing", "k", "floor")


def setting(config, workdir) -> tuple[dict, str | None]:
  """The estimator setting and the prior directory calibration chose (if it ran), else config's."""
  f = config.fidelity
  chosen_path = runner.stage_dir(workdir, "calibrate") / "chosen.json"
  values = {k: f[k] for k in SETTING_KEYS}
  prior_dir = None
  if f.from_calibration and chosen_path.exists():
    chosen = json.loads(chosen_path.read_text())
    values.update({k: chosen[k] for k in SETTING_KEYS if chosen.get(k) is not None})
    prior_dir = chosen.get("prior")
    logging.info("fidelity: the setting of %s: %s", chosen_path, values)
  return values, prior_dir


def _prior_view(config, workdir, tokenizer, values: dict, prior_dir: str | None, vocab_size: int):
  f = config.fidelity
  directory = epath.Path(f.prior or prior_dir or runner.stage_dir(workdir, "prior"))
  try:
    if store.exists(directory):
      counts, _ = store.load(directory, tokenizer, "the evaluated model's tokenizer",
                             config.data.length_policy)
    else:
      if f.prior:
        raise runner.UserError(f"config.fidelity.prior={f.prior}: no prior there")
      records = inputs.corpus_splits(config, workdir)[0].get(f.prior_split)
      if not records:
        raise runner.UserError(f"fidelity: no prior in {directory} and the corpus has no "
                               f"{f.prior_split!r} records to count one (config.fidelity.prior_split)")
      logging.info("fidelity: no prior in %s; counting orders 1..%d on %d %s records", directory,
                   values["order"], len(records), f.prior_split)
      counts = build.counts_from_records(records, tokenizer, int(values["order"]),
                                         config.data.length_policy)
    return PriorView(counts, order=int(values["order"]), smoothing=values["smoothing"],
                     k=int(values["k"]), vocab_size=vocab_size, floor=float(values["floor"]))
  except ValueError as e:
    raise runner.UserError(f"fidelity: prior: {e}") from None


def run_fidelity(config, workdir, records, spec, tokenizer, mesh, student_params) -> dict:
  """The fidelity task's results (proxykd/eval/fidelity.py `run`, plus what was compared)."""
  f = config.fidelity
  teacher = eval_model.resolve(f.teacher_model, key="config.fidelity.teacher_model")
  try:
    check_same_tokenizer(load_tokenizer(teacher.tokenizer_dir), tokenizer, "teacher's", "evaluated model's")
  except ValueError as e:
    raise runner.UserError(f"fidelity: {e}") from None
  proxy_ref = inputs.proxy_ref(f, workdir)
  cfgs = {"teacher": teacher.cfg, "proxy": inputs.inference_config(proxy_ref)}
  if f.student:
    cfgs["student"] = spec.cfg
  sizes = {k: c.vocab_size for k, c in cfgs.items()}
  if len(set(sizes.values())) != 1:
    raise runner.UserError(f"fidelity: the models' vocabularies differ {sizes}: one tokenizer, one "
                           "vocabulary size")
  values, prior_dir = setting(config, workdir)
  view = _prior_view(config, workdir, tokenizer, values, prior_dir, teacher.cfg.vocab_size)
  if f.temperature >= 0 and f.top_p >= 0:
    temperature, top_p = f.temperature, f.top_p
  else:
    try:
      temperature, top_p = fidelity.teacher_sampling(records)
    except ValueError as e:
      raise runner.UserError(f"fidelity: {e}") from None
  rows, _ = pipeline.build_rows(records, tokenizer, config.data, shuffle=False)
  try:
    feature = PriorFeature(view, rows.docs, corpus_rows=False)
  except ValueError as e:
    raise runner.UserError(f"fidelity: the held-out records and the prior: {e}") from None
  shardings_for = trainer.shardings_for(mesh)
  params = {"teacher": eval_model.load(teacher, shardings_for),
            "proxy": inputs.model_for_inference(proxy_ref, shardings_for)[0]}
  if f.student:
    params["student"] = student_params
  param_sh = {k: shd.param_shardings(c, mesh) for k, c in cfgs.items()}
  batch_sh = {k: shd.batch_sharding(mesh, 3 if k in ("prior_ids", "prior_probs") else 2)
              for k in (*fidelity.ROW_KEYS, *PRIOR_KEYS)}
  fn = jax.jit(fidelity.make_fidelity_fn(cfgs, config.loss_chunk), in_shardings=(param_sh, batch_sh, None))
  scalars = fidelity.scalars(kappa=values["kappa"], m=values["m"], tau=values["tau"],
                             temperature=temperature, top_p=top_p)

  def step(batch):
    with shd.mesh_context(mesh):
      return fn(params, batch, scalars)

  host = batches.HostSlice(shd.batch_sharding(mesh), config.score_batch)
  out = fidelity.run(step, rows, feature, config.score_batch, host)
  out.update(teacher=teacher.identity, proxy=proxy_ref, setting=values,
             teacher_sampling={"temperature": temperature, "top_p": top_p}, records=len(records))
  return out
