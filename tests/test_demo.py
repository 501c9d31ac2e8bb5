"""README promise 1: the one demo command runs the whole method end to end, as written, in a fresh
copy of the checkout; its outputs stay under the relative workdir; rerun, it skips every step."""
import json

from readme_demo import DEFAULT_WORKDIR

STEPS = ("collect", "tokenizer", "prior", "proxy_sft", "proxy_dpo", "calibrate", "student_kd",
         "student_sft", "student_kd/eval", "student_sft/eval", "summary")


def test_readme_demo_runs_end_to_end_as_written(readme_demo):
  repo, run, first, second, added, workdir = readme_demo
  assert workdir == DEFAULT_WORKDIR
  assert added and all(f.startswith(workdir.rstrip("/") + "/") for f in added), sorted(added)[:10]
  for i, step in enumerate(STEPS, start=1):
    assert f"[{i}/{len(STEPS)}] {step}\n" in first.stdout, first.stdout[-3000:]
    assert (run / step / "done.json").exists(), step
    assert f"[{i}/{len(STEPS)}] {step}: done already, skipped" in second.stdout
  assert not list(run.rglob("*orbax-checkpoint-tmp*"))
  table = json.loads((run / "summary" / "table.json").read_text())
  assert table["students"] == ["student_kd", "student_sft"]
  nll = next(r for r in table["rows"] if r["what"].startswith("held-out teacher NLL"))
  assert nll["student_kd"] < nll["student_sft"], table  # the distilled student beats SFT
  est = table["estimator"]
  assert est["posterior"] <= min(est["prior only"], est["proxy only"]) + 1e-9, est
  assert "beats student_sft on held-out teacher NLL" in first.stdout
  rounds = [json.loads(l) for l in (run / "proxy_dpo" / "rounds.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rounds] == [0, 1, 2]
  for student in ("student_kd", "student_sft"):
    rows = [json.loads(l) for l in (run / student / "metrics.jsonl").read_text().splitlines()]
    logged = [(row["step"], key) for row in rows for key in row if key != "step"]
    assert len(logged) == len(set(logged))  # no metric of a step written twice
  assert (run / "student_kd" / "weights.png").stat().st_size > 1000
  assert (run / "student_kd" / "hf" / "model.safetensors").exists()
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.AutoModelForCausalLM.from_pretrained(run / "student_kd" / "hf")
  tokenizer = transformers.AutoTokenizer.from_pretrained(run / "student_kd" / "hf")
  assert model.config.vocab_size >= len(tokenizer)
