"""launch/: the shell scripts parse (`bash -n`; they call gcloud or ssh, so tests never run them but
through tests/test_multiprocess_train.py's local gpu_multihost.sh), and launch/README.md names
every script and only pod layouts that exist."""
import re
import subprocess

import pytest

from configs import pods
from conftest import REPO

SCRIPTS = sorted((REPO / "launch").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_is_executable(script):
  proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  assert script.stat().st_mode & 0o111, f"{script.name} is not executable"


def test_readme_names_every_script_and_only_real_layouts():
  text = (REPO / "launch" / "README.md").read_text()
  assert len(SCRIPTS) >= 3
  for script in SCRIPTS:
    assert f"`{script.name}`" in text, script.name
  named = set(re.findall(r"pod=([\w.-]+_llama\d)", text))
  assert named and named <= set(pods.LAYOUTS), named - set(pods.LAYOUTS)
