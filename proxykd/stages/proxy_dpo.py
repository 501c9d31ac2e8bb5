"""Stage `proxy_dpo`: K rounds of DPO on D_p, the teacher's answer chosen and the proxy's own
online sample rejected (METHOD.md stage 1, step 2).

Inputs: the corpus's D_p split, the tokenizer, the warm-up proxy (`<workdir>/proxy_sft` or
`config.init_from`). Outputs in `<workdir>/proxy_dpo/`:
- `rounds/<k>/`: `samples.jsonl` (the rejected samples, written per sampling batch), `reference.npz`
  (the reference log-probs, keyed by the reference and the rows), `checkpoints/`, `metrics.jsonl`;
- `rounds.jsonl`: one line per round (round 0 = the starting model) with the pair counts, the
  degenerate samples, the last DPO metrics, the held-out top-1 agreement with the teacher's tokens
  and NLL, the sampler's compiles; the same table is logged;
- `final.json`: `{"checkpoint": the last round's checkpoints}`, written when every round is done:
  later stages take the aligned proxy from it;
- `hf/`: the aligned proxy (LoRA merged).
A killed run resumes where it stopped: finished rounds are skipped, a round's sampling continues
from its last complete batch (same seeds, same samples), its reference log-probs are reused and its
training resumes from the last checkpoint.
"""
from __future__ import annotations

import hashlib
import io
import json
import time

import numpy as np
from absl import logging
from etils import epath

from proxykd import hosts, runner
from proxykd.data import corpus, packing, pairs, pipeline, split, tokenize
from proxykd.models import checkpoint, hf_io, lora
from proxykd.models.sampling import Sampler
from proxykd.models.tokenizer import end_of_turn_ids, fingerprint, load_tokenizer
from proxykd.stages import inputs
from proxykd.train import preference, scoring, trainer
from proxykd.train import sharding as shd

STAGE = "proxy_dpo"


def _start_ref(config, workdir) -> dict:
  if config.init_from:
    return trainer.weights_ref(config)
  path = runner.stage_dir(workdir, "proxy_sft") / "checkpoints"
  if not checkpoint.is_checkpoint(path):
    raise runner.UserError(f"{path}: no proxy_sft checkpoint; run the proxy_sft stage or set "
                           "--config.init_from=CHECKPOINT_OR_HF_DIR")
  return {"checkpoint": str(path)}


def _tokenizer(config, workdir, ref):
  """The shared tokenizer, refused if it is not the one the starting model was trained with."""
  recorded = None
  if "checkpoint" in ref:
    recorded = checkpoint.restore_meta(ref["checkpoint"]).get("tokenizer")
  tok_dir = epath.Path(config.tokenizer) if config.tokenizer else (
      epath.Path(recorded) if recorded else inputs.tokenizer_dir(config, workdir))
  tokenizer = load_tokenizer(tok_dir)
  if recorded and epath.Path(recorded) != tok_dir:
    from proxykd.models.tokenizer import check_same_tokenizer  # pylint: disable=g-import-not-at-top
    try:
      check_same_tokenizer(load_tokenizer(recorded), tokenizer, "starting proxy's", "configured")
    except ValueError as e:
      raise runner.UserError(f"config.tokenizer={tok_dir}: {e}") from None
  return tok_dir, tokenizer


def _round_records(records: list[dict], config, k: int) -> list[dict]:
  """The prompts of round k (1-based): all of D_p, or the k-th of K parts by a hash of the prompt."""
  if config.dpo.all_each_round:
    return records
  rounds = config.dpo.rounds
  return [r for r in records
          if int(split.unit_hash(split.prompt_key(r), "proxykd-dpo-rounds") * rounds) == k - 1]


def _sample_record(s: pairs.Sample) -> dict:
  return {"id": s.id, "tokens": s.tokens, "finish_reason": s.finish_reason}


def _validate_sample(obj, path, lineno):
  if not (isinstance(obj, dict) and isinstance(obj.get("id"), str) and isinstance(obj.get("tokens"), list)
          and obj.get("finish_reason") in ("stop", "length")):
    raise corpus.CorpusError(f"{path}:{lineno}: not a proxy sample ({{id, tokens, finish_reason}})")
  return obj


def sample_round(sampler: Sampler, params, examples, path: epath.Path, config, k: int, end_ids
                 ) -> dict[str, pairs.Sample]:
  """One rejected sample per example's prompt, from `params`, in batches of dpo.sample_batch (the
  prompts sorted by length), each batch seeded by (seed, round, batch) and appended to `path`
  once complete: a resumed round redoes only missing batches, with the same results."""
  done = {s["id"]: pairs.Sample(**s) for s in corpus.read_jsonl(path, _validate_sample)} \
      if path.exists() else {}
  d = config.dpo
  order = sorted(examples, key=lambda e: (pairs.prompt_length(e), e.id))
  batches = [order[i:i + d.sample_batch] for i in range(0, len(order), d.sample_batch)]
  todo = [(b, batch) for b, batch in enumerate(batches) if any(e.id not in done for e in batch)]
  if todo:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=len(batches), initial=len(batches) - len(todo), unit="batch",
               desc=f"round {k} sampling", dynamic_ncols=True, disable=not config.train.progress_bar)
    writer = (corpus.CorpusWriter(path, sync_every=d.sample_batch, validate=_validate_sample)
              if hosts.is_main() else None)  # every host samples every batch; one writes
    try:
      for b, batch in todo:
        prompts = [e.ids[:pairs.prompt_length(e)].tolist() for e in batch]
        gens = sampler.generate(params, prompts, max_new_tokens=d.max_new_tokens,
                                temperature=d.temperature, top_p=d.top_p, top_k=d.top_k,
                                seed=int(np.random.SeedSequence([d.seed, k, b]).generate_state(1)[0] >> 1),
                                eos_ids=end_ids)
        for e, g in zip(batch, gens):
          if e.id not in done:
            done[e.id] = pairs.Sample(e.id, g.tokens, g.finish_reason)
            if writer is not None:
              writer.write(_sample_record(done[e.id]))
        if writer is not None:
          writer.sync()
        bar.update(1)
    finally:
      if writer is not None:
        writer.close()
    bar.close()
  return done


def _reference_logp(scorer, ref_params, ref_name: str, rows: packing.Rows, path: epath.Path
                    ) -> np.ndarray:
  """The reference's log-prob of every slot's target, cached under a key of reference + rows."""
  h = hashlib.sha256(ref_name.encode())
  for k in ("inputs", "targets", "positions", "segment_ids"):
    h.update(np.ascontiguousarray(rows.arrays[k]).tobytes())
  key = h.hexdigest()[:20]
  if path.exists():
    with np.load(io.BytesIO(path.read_bytes())) as z:
      if str(z["key"]) == key:
        return z["ref_logp"]
  ref_logp = scorer(ref_params, rows)["logp"].astype(np.float32)
  if hosts.is_main():
    buf = io.BytesIO()
    np.savez(buf, key=np.asarray(key), ref_logp=ref_logp)
    path.write_bytes(buf.getvalue())
  return ref_logp


def _read_rounds(path: epath.Path) -> dict[int, dict]:
  if not path.exists():
    return {}
  return {r["round"]: r for r in (json.loads(l) for l in path.read_text().splitlines() if l.strip())}


def _log_table(rounds: dict[int, dict]) -> None:
  lines = ["round  pairs  dropped  dpo/acc  margin   held-out top-1  held-out NLL  compiles"]
  for k in sorted(rounds):
    r = rounds[k]
    lines.append(f"{k:5d}  {r.get('pairs', 0):5d}  {r.get('dropped', 0):7d}  "
                 f"{r.get('dpo/accuracy', float('nan')):7.3f}  {r.get('dpo/margin', float('nan')):6.3f}"
                 f"   {r['heldout_top1']:14.4f}  {r['heldout_nll']:12.4f}  {r.get('compiles', 0):8d}")
  logging.info("proxy_dpo rounds:\n%s", "\n".join(lines))


def run(config, workdir):
  out = runner.stage_dir(workdir, STAGE)
  out.mkdir(parents=True, exist_ok=True)
  ref = _start_ref(config, workdir)
  tok_dir, tokenizer = _tokenizer(config, workdir, ref)
  records, heldout, corpus_path = inputs.load_split(config, workdir)
  cfg = trainer.model_config(config, ref)
  mesh = trainer.make_mesh(config, {"model": cfg})
  shardings_for = trainer.shardings_for(mesh)
  d, data = config.dpo, config.data
  if d.rounds < 1:
    raise runner.UserError(f"config.dpo.rounds={d.rounds} must be >= 1")
  if d.reference not in ("round_start", "warmup"):
    raise runner.UserError(f"config.dpo.reference={d.reference!r}: choose round_start or warmup")
  try:
    dpo = preference.dpo_loss(cfg, beta=d.beta, lam=d.lam, nll_weight=d.nll_weight, kind=d.loss,
                              chunk_len=config.train.loss_chunk)
  except ValueError as e:
    raise runner.UserError(str(e)) from None
  heldout_rows = _heldout_rows(heldout, tokenizer, config, out) if heldout else None
  batch = config.train.batch_size
  scorer = scoring.Scorer(cfg, mesh, batch, data.seq_len, config.train.loss_chunk)
  sampler = Sampler(cfg, param_shardings=shd.param_shardings(cfg, mesh),
                    batch_sharding=shd.batch_sharding(mesh), batch_multiple=shd.batch_divisor(mesh),
                    context=lambda: shd.mesh_context(mesh), min_batch=d.sample_batch)
  end_ids = end_of_turn_ids(tokenizer)
  decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
  policy = {"empty": d.on_empty, "truncated": d.on_truncated, "identical": d.on_identical}
  meta = {"stage": STAGE, "corpus": str(corpus_path), "split": config.split_name,
          "tokenizer": str(tok_dir), "tokenizer_fingerprint": fingerprint(tokenizer), "start": ref}
  rounds_path = out / "rounds.jsonl"
  rounds = _read_rounds(rounds_path)

  def record_round(k: int, row: dict) -> None:
    rounds[k] = {"round": k, **row}
    if hosts.is_main():
      rounds_path.write_text("".join(json.dumps(rounds[i]) + "\n" for i in sorted(rounds)))

  def evaluate(params) -> dict:
    if heldout_rows is None:
      return {"heldout_top1": float("nan"), "heldout_nll": float("nan")}
    stats = scoring.teacher_token_stats(scorer(params, heldout_rows), heldout_rows)
    return {"heldout_top1": stats["top1"], "heldout_nll": stats["nll"], "heldout_tokens": stats["tokens"]}

  params = None
  last_done = max((k for k in rounds if k > 0), default=0)
  if last_done >= d.rounds:
    logging.info("%s: all %d rounds are done (%s)", STAGE, d.rounds, rounds_path)
  elif last_done == 0:
    params = checkpoint.load_params(ref, cfg, shardings_for)
    if 0 not in rounds:
      record_round(0, {"model": "start", **evaluate(params)})
  else:
    params, _ = checkpoint.restore_params(out / "rounds" / f"{last_done:03d}" / "checkpoints",
                                          shardings_for)
  for k in range(last_done + 1, d.rounds + 1):
    round_dir = out / "rounds" / f"{k:03d}"
    round_dir.mkdir(parents=True, exist_ok=True)
    round_records = _round_records(records, config, k)
    examples, tok_stats = tokenize.tokenize(round_records, tokenizer, data.length_policy)
    examples, tok_stats = tokenize.truncate(examples, data.seq_len + 1, data.truncation, tok_stats)
    t0 = time.perf_counter()
    compiles = sampler.compiles
    samples = sample_round(sampler, params, examples, round_dir / "samples.jsonl", config, k, end_ids)
    sample_s = time.perf_counter() - t0
    units, counts = pairs.build_pairs(examples, samples, seq_len=data.seq_len,
                                      truncation=data.truncation, end_ids=end_ids, decode=decode,
                                      policy=policy)
    if not units:
      raise runner.UserError(f"{STAGE}: round {k} has no usable pair ({counts}); check "
                             "config.dpo.on_* and the sampling settings")
    rows = packing.pack(units, data.seq_len)
    if d.reference == "warmup":
      ref_params, ref_name = checkpoint.load_params(ref, cfg, shardings_for), json.dumps(ref)
    else:
      ref_params, ref_name = params, f"round {k} start: {json.dumps(ref)} + {last_done}"
    rows.arrays["ref_logp"] = _reference_logp(scorer, ref_params, ref_name, rows,
                                              round_dir / "reference.npz")
    del ref_params
    t1 = time.perf_counter()
    result = trainer.fit(config, round_dir, cfg, mesh, dpo, rows, None,
                         {**meta, "round": k, "pairs": counts}, ref, start=params)
    params = result.params
    last = _last_metrics(round_dir / "metrics.jsonl")
    record_round(k, {"pairs": counts.get("pairs", 0), "dropped": counts.get("dropped", 0),
                     "degenerate": {x: counts.get(x, 0) for x in ("empty", "truncated", "identical")},
                     "truncated_to_fit": counts.get("truncated_to_fit", 0), "tokenized": tok_stats.to_dict(),
                     **last, **evaluate(params), "compiles": sampler.compiles - compiles,
                     "sample_seconds": round(sample_s, 2), "train_seconds": round(time.perf_counter() - t1, 2)})
    last_done = k
    _log_table(rounds)
  final = out / "rounds" / f"{d.rounds:03d}" / "checkpoints"
  if hosts.is_main():
    (out / inputs.FINAL).write_text(json.dumps({"checkpoint": str(final)}))
  if config.export:
    if params is None:
      params, _ = checkpoint.restore_params(final, shardings_for)
    export_cfg = cfg
    if cfg.lora_rank:
      params, export_cfg = lora.merge(params, cfg)
    hf_io.export_hf(params, export_cfg, out / "hf", tokenizer_dir=tok_dir, dtype=config.export_dtype)
    logging.info("%s: exported %s", STAGE, out / "hf")
  _log_table(rounds)
  return out


def _heldout_rows(records, tokenizer, config, out) -> packing.Rows:
  return pipeline.build_rows(records, tokenizer, config.data, shuffle=False,
                             cache_dir=out / "data_cache", name="heldout")[0]


def _last_metrics(path: epath.Path) -> dict:
  """The DPO metrics of the round's last logged step."""
  last = {}
  for line in path.read_text().splitlines():
    row = json.loads(line)
    last.update({k: v for k, v in row.items() if k.startswith(("dpo/", "sft/"))})
  return last
