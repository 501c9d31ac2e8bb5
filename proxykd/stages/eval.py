"""Stage `eval`: a model (one of our checkpoints or an HF directory) on the paper's benchmarks.

Generative tasks (gsm8k, bbh, synthetic, prompts) run greedy through the sharded KV-cache sampler
in batches (proxykd/eval/generate.py); `choice` scores multiple-choice files by log-likelihood and
`heldout` the teacher corpus' held-out split, both through the jitted scorer on the mesh;
`fidelity` measures the estimator against a teacher whose weights we have (eval_fidelity.py). Outputs
in `config.output` (default `<workdir>/eval/`): `predictions/<task>.jsonl` (appended batch by batch; a rerun with the same
model and settings reuses them), `results.json` and `results.md` (the tasks of earlier runs of the
same model are kept, so tasks can be evaluated one run at a time).
"""
from __future__ import annotations

import time

from absl import logging
from etils import epath

from proxykd import runner
from proxykd.data import corpus, prompts as prompt_sources, split
from proxykd.eval import choice, generate, jsonl, loglik, model as eval_model, results as eval_results, tasks
from proxykd.models.sampling import Sampler
from proxykd.models.tokenizer import end_of_turn_ids, load_tokenizer
from proxykd.stages import eval_fidelity, inputs
from proxykd.train import scoring, trainer
from proxykd.train import sharding as shd

STAGE = "eval"
TASKS = ("gsm8k", "bbh", "synthetic", "prompts", "choice", "heldout", "fidelity")


def _task_names(config) -> list[str]:
  names = [t.strip() for t in config.tasks.split(",") if t.strip()]
  unknown = sorted(set(names) - set(TASKS))
  if unknown or not names:
    raise runner.UserError(f"config.tasks={config.tasks!r}: unknown {unknown}; choose from {TASKS}")
  return names


def generative_task(name: str, config) -> tasks.Task:
  """The Task `name` as configured (gsm8k, bbh, synthetic or prompts)."""
  limit = config.limit
  if name == "gsm8k":
    g = config.gsm8k
    return tasks.gsm8k_task(prompt_sources.data_dir(g.data_dir), split=g.split, shots=g.shots,
                            system_prompt=g.system_prompt, limit=limit, max_new_tokens=g.max_new_tokens)
  if name == "bbh":
    b = config.bbh
    return tasks.bbh_task(prompt_sources.data_dir(b.data_dir), tasks=b.tasks, shots=b.shots,
                          limit=limit, max_new_tokens=b.max_new_tokens)
  if name == "synthetic":
    s = config.synthetic
    return tasks.synthetic_task(num=s.num, split=s.split, seed=s.seed, system_prompt=s.system_prompt,
                                limit=limit, max_new_tokens=s.max_new_tokens)
  p = config.prompts
  return tasks.prompts_task(p, name=p.name, answer_field=p.answer_field,
                            answer_format=p.answer_format,
                            labels=[l for l in p.labels.split(",") if l],
                            system_prompt=p.system_prompt, limit=limit,
                            max_new_tokens=p.max_new_tokens, stop=p.stop.split(","))


def _validate_prediction(obj, path, lineno):
  if not (isinstance(obj, dict) and isinstance(obj.get("id"), str) and "key" in obj and "correct" in obj):
    raise corpus.CorpusError(f"{path}:{lineno}: not a prediction line")
  return obj


def _progress_bar(name: str, enabled: bool):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = None

  def update(progress: generate.Progress, total: int) -> None:
    nonlocal bar
    if bar is None:
      bar = tqdm(total=total, desc=name, unit="ex", dynamic_ncols=True, disable=not enabled)
    bar.n = progress.done
    bar.set_postfix(acc=f"{progress.accuracy:.3f}")
    bar.refresh()
    if progress.done >= total:
      bar.close()

  return update


def run_generative(task: tasks.Task, sampler: Sampler, params, tokenizer, config, spec,
                   pred_dir: epath.Path) -> dict:
  path = pred_dir / f"{task.name}.jsonl"
  done = {r["id"]: r for r in corpus.read_jsonl(path, _validate_prediction, unique=False)} \
      if path.exists() else {}
  end_ids = end_of_turn_ids(tokenizer)

  def gen(prompts, max_new, stop_ids):
    return sampler.generate(params, prompts, max_new_tokens=max_new, temperature=0.0,
                            eos_ids=end_ids, stop_ids=stop_ids)

  t0 = time.perf_counter()
  with corpus.CorpusWriter(path, sync_every=config.batch_size, validate=_validate_prediction) as w:
    def write(rows):
      for r in rows:
        w.write(r)
      w.sync()
    records = generate.run_task(task, gen, tokenizer, batch_size=config.batch_size,
                                max_context=spec.cfg.max_position_embeddings, end_ids=end_ids,
                                model_key=spec.identity, done=done, write=write,
                                on_progress=_progress_bar(task.name, config.progress))
  # The file in item order, without lines of other settings.
  jsonl.write_lines(path, records)
  summary = generate.summarize(task, records)
  summary["seconds"] = round(time.perf_counter() - t0, 2)
  return summary


def open_model(config, batches: dict[str, int]):
  """-> (ModelSpec, tokenizer, mesh) for `config.model` (made absolute here: `model` cannot be a
  PATH_KEYS key, other configs' `teacher.model` is a model name), every batch checked against the
  mesh. Loads no weight."""
  spec = eval_model.resolve(runner.absolute_path(config.model), runner.absolute_path(config.tokenizer),
                            config.dtype)
  try:
    tokenizer = load_tokenizer(spec.tokenizer_dir)
  except (OSError, ValueError) as e:
    raise runner.UserError(f"tokenizer {spec.tokenizer_dir}: {e}") from None
  if not getattr(tokenizer, "chat_template", None):
    raise runner.UserError(f"tokenizer {spec.tokenizer_dir} has no chat template; set "
                           "--config.tokenizer=DIR to one that has")
  try:
    mesh = shd.mesh_from_config(config.mesh)
    shd.validate_mesh(mesh, {"model": spec.cfg}, shd.batch_divisor(mesh))  # the heads
  except (KeyError, ValueError) as e:
    raise runner.UserError(str(e)) from None
  div = shd.batch_divisor(mesh)
  for key, b in batches.items():
    if b < 1 or b % div:
      raise runner.UserError(f"{key}={b} does not divide over the mesh's data x fsdp = {div} devices")
  return spec, tokenizer, mesh


def run(config, workdir):
  out = epath.Path(config.output or runner.stage_dir(workdir, STAGE))
  names = _task_names(config)
  spec, tokenizer, mesh = open_model(config, {"config.batch_size": config.batch_size,
                                              "config.score_batch": config.score_batch})
  div = shd.batch_divisor(mesh)
  built = {n: generative_task(n, config) for n in names if n in ("gsm8k", "bbh", "synthetic", "prompts")}
  questions = {}
  if "choice" in names:
    questions = _choice_files(config)
  heldout_records = _heldout(config, workdir) if {"heldout", "fidelity"} & set(names) else None
  params = eval_model.load(spec, trainer.shardings_for(mesh))
  name = config.name or spec.name
  logging.info("%s: %s (%s) on %s", STAGE, name, spec.identity, ", ".join(names))
  pred_dir = out / "predictions"
  pred_dir.mkdir(parents=True, exist_ok=True)
  results = {"name": name, "model": spec.identity, "tokenizer": spec.tokenizer_dir, "tasks": {}}
  if built:
    sampler = Sampler(spec.cfg, param_shardings=shd.param_shardings(spec.cfg, mesh),
                      batch_sharding=shd.batch_sharding(mesh), batch_multiple=div,
                      context=lambda: shd.mesh_context(mesh))
    for task in built.values():
      r = results["tasks"][task.name] = run_generative(task, sampler, params, tokenizer, config,
                                                        spec, pred_dir)
      logging.info("%s: %s accuracy %.4f (%d items)", STAGE, task.name, r["accuracy"], r["total"])
  if questions or "heldout" in names:
    scorer = scoring.Scorer(spec.cfg, mesh, config.score_batch, config.data.seq_len, config.loss_chunk)
    score_rows = lambda rows: scorer(params, rows)
    for bench, qs in questions.items():
      t0 = time.perf_counter()
      scored = loglik.response_logprobs(choice.choice_records(qs, config.choice.system_prompt),
                                        tokenizer, score_rows, seq_len=config.data.seq_len,
                                        truncation=config.data.truncation)
      rows = choice.predictions(qs, scored)
      jsonl.write_lines(pred_dir / f"choice-{bench}.jsonl", rows)
      results["tasks"][f"choice/{bench}"] = {**choice.summarize(rows),
                                             "seconds": round(time.perf_counter() - t0, 2)}
    if "heldout" in names:
      results["tasks"]["heldout"] = heldout_stats(heldout_records, tokenizer, score_rows, config)
  if "fidelity" in names:
    results["tasks"]["fidelity"] = eval_fidelity.run_fidelity(config, workdir, heldout_records, spec,
                                                              tokenizer, mesh, params)
  earlier = eval_results.read_dir(out)
  if earlier and earlier.get("model") == spec.identity:  # Tasks of earlier runs of this model stay.
    results["tasks"] = {**{k: v for k, v in earlier["tasks"].items() if k not in results["tasks"]},
                        **results["tasks"]}
  elif earlier:
    logging.warning("%s: %s held results of another model (%s); replaced", STAGE,
                    out / eval_results.RESULTS, earlier.get("model"))
  eval_results.write(out, results)
  logging.info("%s: wrote %s\n%s", STAGE, out / "results.json", eval_results.markdown(results))
  return out


def _choice_files(config) -> dict[str, list[choice.Question]]:
  path = config.choice.path
  if not path:
    raise runner.UserError("tasks=choice needs --config.choice.path=FILE_OR_DIR (multiple-choice JSONL)")
  p = epath.Path(path)
  files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
  if not files:
    raise runner.UserError(f"config.choice.path={path}: no .jsonl files there")
  qs = {}
  for f in files:
    qs[f.stem] = choice.load_questions(f)
    if config.limit > 0:
      qs[f.stem] = qs[f.stem][:config.limit]
  return qs


def _heldout(config, workdir) -> list[dict]:
  """The corpus' held-out records (split as the training stages split it), `config.limit` of them."""
  parts, path = inputs.corpus_splits(config, workdir)
  records = parts[split.HELDOUT]
  if not records:
    raise runner.UserError(f"tasks=heldout/fidelity: {path} has no held-out records "
                           f"(config.split.heldout={config.split.heldout})")
  return records[:config.limit] if config.limit > 0 else records


def heldout_stats(records, tokenizer, score_rows, config) -> dict:
  """NLL (nats/token) and top-1 agreement of the model on the teacher's held-out tokens."""
  scored = [s for s in loglik.response_logprobs(records, tokenizer, score_rows,
                                                seq_len=config.data.seq_len,
                                                truncation=config.data.truncation,
                                                length_policy=config.data.length_policy) if s]
  n = sum(s.num_tokens for s in scored)
  return {"nll": -sum(s.sum_logprob for s in scored) / max(n, 1),
          "top1": sum(sum(s.top1) for s in scored) / max(n, 1), "tokens": n, "records": len(scored)}
