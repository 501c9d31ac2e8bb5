"""The Colab notebooks run top to bottom on the built-in demo (their code cells, in order)."""
import json
import os

import pytest

from conftest import REPO, run_python


@pytest.mark.parametrize("name", ["demo.ipynb"])
def test_notebook_runs(tmp_path, name):
  notebook = json.loads((REPO / "notebooks" / name).read_text())
  code = "\n\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
  assert "google.colab" in code
  out = run_python(f"import os; os.chdir({str(REPO / 'notebooks')!r})\n" + code,
                   env={"PROXYKD_NOTEBOOK_WORKDIR": str(tmp_path), "PROXYKD_NOTEBOOK_STEPS": "8",
                        "MPLBACKEND": "Agg"}, timeout=500)
  assert "teacher samples" in out and "final train loss" in out and "proxy:" in out
  assert os.path.getsize(tmp_path / "loss.png") > 1000
