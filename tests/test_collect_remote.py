"""`collect` into a workdir that is not local (gs://, here an in-memory fsspec stand-in): staged, resumable."""
import json
import os
import shutil

import pytest
from etils import epath
from etils.epath import backend as epath_backend, gpath
from fsspec.implementations.memory import MemoryFileSystem

from configs import collect as collect_config
from proxykd.data import corpus
from proxykd.stages import collect
from proxykd.teacher import server, serving, staging, synthetic

KEY = "sk-remote-test-key"
WORKDIR = "gs://bucket/run"


class FakeGCS(MemoryFileSystem):
  """gs://bucket/... objects in memory (offline), shaped like gcsfs for etils' fsspec backend."""
  protocol = ("gs",)
  store = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    path = path[len("gs://"):] if path.startswith("gs://") else path
    return "/" + path.strip("/")


@pytest.fixture()
def gcs(monkeypatch, tmp_path):
  fs = FakeGCS(skip_instance_cache=True)
  fs.store.clear()
  fs.pseudo_dirs[:] = [""]
  real = epath_backend.fsspec_backend.fs
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setattr(epath_backend.fsspec_backend, "fs",
                      lambda path: fs if os.fspath(path).startswith("gs://") else real(path))
  monkeypatch.chdir(tmp_path)  # A gs:// path mistaken for a local one would show up here as ./gs:
  monkeypatch.setenv("PROXYKD_TEST_KEY", KEY)
  yield fs
  assert not (tmp_path / "gs:").exists()


def make_config(url, batch=False):
  c = collect_config.get_config()
  c.progress = False
  c.prompts.num = 12
  c.teacher.update(base_url=url, api_key_env="PROXYKD_TEST_KEY", max_tokens=128)
  c.batch.update(enabled=batch, poll_s=0.05)
  return c


def test_staging_helpers_on_the_fake_bucket(gcs, tmp_path):
  remote = epath.Path("gs://bucket/x/c.jsonl")
  assert not staging.is_local(remote) and staging.is_local(tmp_path / "c.jsonl") and staging.is_local("rel/c")
  remote.parent.mkdir(parents=True, exist_ok=True)
  remote.write_text("old\n")
  with staging.local_copies([remote, tmp_path / "here.txt"]) as (a, b):
    assert staging.is_local(a) and open(a).read() == "old\n" and b == str(tmp_path / "here.txt")
    with open(a, "a") as f:
      f.write("new\n")
  assert remote.read_text() == "old\nnew\n" and not os.path.exists(a)
  staging.write_text("gs://bucket/x/s.json", "{}")
  assert epath.Path("gs://bucket/x/s.json").read_text() == "{}"


def test_a_failed_upload_keeps_the_local_copy_and_says_where(gcs, monkeypatch):
  remote = epath.Path("gs://bucket/y/c.jsonl")
  with pytest.raises(collect.runner.UserError, match=r"could not copy .*c\.jsonl to gs://bucket/y/c\.jsonl "
                     r"\(OSError: bucket gone\); the local copy is kept") as e:
    with staging.local_copies([remote]) as (name,):
      with open(name, "w") as f:
        f.write("precious\n")
      monkeypatch.setattr(staging, "_copy", lambda src, dst: (_ for _ in ()).throw(OSError("bucket gone")))
  assert open(name).read() == "precious\n" and name in str(e.value)
  shutil.rmtree(os.path.dirname(name))


def test_collect_into_a_remote_workdir_resumes_and_writes_side_files_there(gcs):
  with serving.BackgroundServer(server.create_app(synthetic.SyntheticBackend(), api_key=KEY)) as url:
    summary = collect.run(make_config(url), WORKDIR)
    out = epath.Path(WORKDIR) / "collect"
    recs = list(corpus.read_corpus(out / "corpus.jsonl"))
    assert len(recs) == 12 and summary["corpus"] == f"{WORKDIR}/collect/corpus.jsonl"
    assert json.loads((out / "summary.json").read_text())["collected"] == 12
    # Resume from the remote copy: drop 5 records there, rerun, only those 5 are asked for again.
    lines = (out / "corpus.jsonl").read_text().splitlines(keepends=True)
    (out / "corpus.jsonl").write_text("".join(lines[:7]))
    again = collect.run(make_config(url), WORKDIR)
    assert (again["already_present"], again["collected"]) == (7, 5)
    assert sorted(r["id"] for r in corpus.read_corpus(out / "corpus.jsonl")) == sorted(r["id"] for r in recs)


def test_batch_mode_into_a_remote_workdir(gcs):
  with serving.BackgroundServer(server.create_app(synthetic.SyntheticBackend(), api_key=KEY)) as url:
    summary = collect.run(make_config(url, batch=True), WORKDIR)
  out = epath.Path(WORKDIR) / "collect"
  state = json.loads((out / "batches.json").read_text())
  assert summary["collected"] == 12 and [b["merged"] for b in state["batches"]] == [True]
  assert len((out / state["batches"][0]["request_file"]).read_text().splitlines()) == 12
  assert len(list(corpus.read_corpus(out / "corpus.jsonl"))) == 12
