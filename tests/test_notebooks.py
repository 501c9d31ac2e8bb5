"""The Colab notebooks, executed cell by cell with nbclient on a kernel of this interpreter (ipykernel's
`python3`), on the output of README command 1 (the session's `readme_demo` run). Any cell error
fails the test: nbclient raises CellExecutionError, and no cell catches errors.

demo.ipynb runs in that run's checkout copy, as from a checkout: its "run the demo" cell runs the
demo command again, which finds every step done and skips it. analysis.ipynb runs from this
checkout on the same run, given by PROXYKD_NOTEBOOK_WORKDIR."""
import base64
import json
import math
import re

import nbformat
from nbclient import NotebookClient

from conftest import REPO

STEPS = 11  # the demo pipeline's steps (tests/test_demo.py STEPS)


def execute(name: str, cwd, monkeypatch, env: dict[str, str]) -> nbformat.NotebookNode:
  """notebooks/<name> of this checkout, executed in `cwd` with `env` added to the kernel's."""
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.delenv("PROXYKD_NOTEBOOK_WORKDIR", raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
  NotebookClient(nb, kernel_name="python3", timeout=600,
                 resources={"metadata": {"path": str(cwd)}}).execute()
  return nb


def outputs(nb) -> tuple[str, list[str], list[bytes]]:
  """(all printed text, text/markdown outputs, PNG images shown) of the executed code cells."""
  text, markdown, images = [], [], []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      assert out["output_type"] != "error", out
      if out["output_type"] == "stream" and out["name"] == "stdout":
        text.append(out["text"])
      data = out.get("data", {})
      if "text/markdown" in data:
        markdown.append(data["text/markdown"])
      if "image/png" in data:
        images.append(base64.b64decode(data["image/png"]))
  return "".join(text), markdown, images


def test_demo_notebook_on_the_readme_demo(readme_demo, monkeypatch):
  repo, run, *_ = readme_demo
  nb = execute("demo.ipynb", repo / "notebooks", monkeypatch, {})
  code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
  assert "google.colab" in code and "PROXYKD_REPO" in code  # the Colab install path is kept
  assert "configs/student_kd.py" in code
  text, markdown, images = outputs(nb)
  # The demo already ran in runs/demo: the command found every step done.
  for i in range(1, STEPS + 1):
    assert re.search(rf"^\[{i}/{STEPS}\] \S+: done already, skipped$", text, re.M), text[-3000:]
  assert f"[{STEPS}/{STEPS}] summary\n" not in text
  assert markdown == [(run / "summary" / "table.md").read_text()]
  assert "| held-out teacher NLL (nats/token, lower is better) |" in markdown[0]
  table = json.loads((run / "summary" / "table.json").read_text())
  nll = next(r for r in table["rows"] if r["what"].startswith("held-out teacher NLL"))
  assert (f"held-out teacher NLL: distilled {nll['student_kd']:.4f}, "
          f"SFT {nll['student_sft']:.4f} nats/token") in text
  assert "curves of: ['proxy_dpo', 'proxy_sft', 'student_kd', 'student_sft']" in text
  assert re.search(r"^\s+2\s+0\.\d{4}\s+\d\.\d{4}", text, re.M)  # DPO round 2's row
  assert len(images) == 5 and all(i.startswith(b"\x89PNG") for i in images)
  shown = set(images)
  for name in ("training_curves", "students", "dpo_rounds", "calibration"):
    png = (run / "notebook" / f"{name}.png").read_bytes()
    assert len(png) > 10_000 and png in shown, name
  assert (run / "student_kd" / "weights.png").read_bytes() in shown


def test_analysis_notebook_on_the_readme_demo(readme_demo, monkeypatch):
  _, run, *_ = readme_demo
  nb = execute("analysis.ipynb", REPO / "notebooks", monkeypatch,
               {"PROXYKD_NOTEBOOK_WORKDIR": str(run)})
  text, _, images = outputs(nb)
  heldout = re.search(r"(\d+) held-out teacher responses", text)
  assert heldout and int(heldout.group(1)) > 20, text[:2000]
  # The chosen response is printed whole, and it is a held-out record of the run's corpus.
  teacher = text.split("teacher: ", 1)[1].split("\nkappa, m, tau:", 1)[0].strip()
  corpus = [json.loads(l) for l in (run / "collect" / "corpus.jsonl").read_text().splitlines()]
  assert teacher in {r["response"].strip() for r in corpus}
  chosen = json.loads((run / "calibrate" / "chosen.json").read_text())
  assert f"kappa, m, tau: {chosen['kappa']} {chosen['m']} {chosen['tau']}" in text
  # The initial weights are the random init: near uniform over the vocabulary.
  vocab = json.loads((run / "student_kd" / "config.json").read_text())["model"]["vocab_size"]
  initial = float(re.search(r"'initial weights': ([0-9.]+)", text).group(1))
  assert abs(initial - math.log(vocab)) < 0.2, (initial, vocab)
  moved = re.findall(r"^\s+\d+\s+\S+\s+[01]\.\d{3} ->\s+[01]\.\d{3}\s+[01]\.\d{3}\s+[01]\.\d{3}$",
                     text, re.M)
  assert len(moved) == 8, text[-3000:]
  assert "round 2: held-out top-1" in text
  assert len(images) == 5 and all(i.startswith(b"\x89PNG") for i in images)
  for name in ("records", "top_tokens", "teacher_tokens", "dpo_rounds", "calibration"):
    png = (run / "notebook" / f"{name}.png").read_bytes()
    assert len(png) > 10_000 and png in set(images), name
