"""The teacher-corpus schema: validation, torn-line handling, durable append, stable ids."""
import json

import pytest

from proxykd.data import corpus
from proxykd.errors import UserError

MSGS = [{"role": "system", "content": "Answer."}, {"role": "user", "content": "1+1?"}]
TEACHER = {"model": "synthetic", "temperature": 0.7, "top_p": 1.0, "max_tokens": 64, "seed": None,
           "stop": None, "top_logprobs": 2}


def make(i=0, **kw):
  rec = {"id": corpus.record_id(MSGS, TEACHER, i), "messages": MSGS, "response": "1+1=2\n#### 2",
         "sample_index": i, "teacher": TEACHER, "finish_reason": "stop",
         "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
         "logprobs": [{"token": "1", "logprob": -0.1,
                       "top_logprobs": [{"token": "1", "logprob": -0.1}, {"token": "2", "logprob": -2.5}]}]}
  rec.update(kw)
  return rec


def test_ids_are_stable_and_depend_on_prompt_params_and_sample():
  a = corpus.record_id(MSGS, TEACHER, 0)
  assert a == corpus.record_id([dict(m) for m in MSGS], dict(TEACHER), 0)
  assert a != corpus.record_id(MSGS, TEACHER, 1)
  assert a != corpus.record_id(MSGS, {**TEACHER, "temperature": 1.0}, 0)
  assert a != corpus.record_id(MSGS[1:], TEACHER, 0)
  # Parameters outside ID_PARAMS (e.g. n, concurrency) do not change ids.
  assert a == corpus.record_id(MSGS, {**TEACHER, "n": 4}, 0)


def test_write_read_roundtrip_and_ids(tmp_path):
  path = tmp_path / "c" / "corpus.jsonl"
  with corpus.CorpusWriter(path, sync_every=2) as w:
    for i in range(5):
      w.write(make(i))
  recs = list(corpus.read_corpus(path))
  assert [r["sample_index"] for r in recs] == list(range(5))
  assert recs[0]["logprobs"][0]["top_logprobs"][1] == {"token": "2", "logprob": -2.5}
  assert corpus.corpus_ids(path) == {make(i)["id"] for i in range(5)}
  assert corpus.corpus_ids(tmp_path / "missing.jsonl") == set()


@pytest.mark.parametrize("bad, what", [
    ({"response": 3}, "`response`"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
    ({"usage": {"prompt_tokens": 1}}, "`usage`"),
    ({"logprobs": [{"token": "a", "logprob": 0.5, "top_logprobs": []}]}, "logprobs[0]"),
    ({"status": "failed"}, "failed.jsonl"),
    ({"id": ""}, "`id`"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, what):
  path = tmp_path / "corpus.jsonl"
  path.write_text(json.dumps(make(0)) + "\n" + json.dumps(make(1, **bad)) + "\n" + json.dumps(make(2)) + "\n")
  with pytest.raises(UserError, match=rf"corpus.jsonl:2: .*{__import__('re').escape(what)}"):
    list(corpus.read_corpus(path))


def test_bad_json_and_duplicates_are_errors(tmp_path):
  path = tmp_path / "corpus.jsonl"
  path.write_text(json.dumps(make(0)) + "\n{not json\n" + json.dumps(make(1)) + "\n")
  with pytest.raises(corpus.CorpusError, match=r"corpus.jsonl:2: not valid JSON"):
    list(corpus.read_corpus(path))
  path.write_text(json.dumps(make(0)) + "\n\n" + json.dumps(make(0)) + "\n")
  with pytest.raises(corpus.CorpusError, match=r"corpus.jsonl:3: duplicate id .*first on line 1"):
    list(corpus.read_corpus(path))


def test_torn_last_line_dropped_by_reader_and_cut_by_writer(tmp_path):
  path = tmp_path / "corpus.jsonl"
  full = json.dumps(make(0)) + "\n" + json.dumps(make(1)) + "\n"
  torn = json.dumps(make(2))[:40]
  path.write_text(full + torn)
  assert [r["sample_index"] for r in corpus.read_corpus(path)] == [0, 1]
  with corpus.CorpusWriter(path) as w:  # Opening for append cuts the torn tail first.
    w.write(make(3))
  assert path.read_text() == full + json.dumps(make(3), separators=(",", ":")) + "\n"
  # An unterminated but complete last line (hand-written file) is kept, and completed on append.
  path.write_text(json.dumps(make(0)))
  assert len(list(corpus.read_corpus(path))) == 1
  with corpus.CorpusWriter(path) as w:
    w.write(make(1))
  assert [r["sample_index"] for r in corpus.read_corpus(path)] == [0, 1]


def test_writer_refuses_invalid_records_and_failures_file(tmp_path):
  with corpus.CorpusWriter(tmp_path / "corpus.jsonl") as w:
    with pytest.raises(corpus.CorpusError, match="record to append"):
      w.write(make(0, response=None))
  fail = {k: make(0)[k] for k in ("id", "messages", "sample_index", "teacher")}
  fail.update(status="failed", error={"status_code": 400, "type": "BadRequestError", "message": "too long"})
  path = tmp_path / corpus.FAILED_FILENAME
  with corpus.CorpusWriter(path, validate=corpus.validate_failure) as w:
    w.write(fail)
    w.write(fail)
  assert [f["error"]["message"] for f in corpus.read_failures(path)] == ["too long", "too long"]


def test_background_fsync_errors_surface_at_sync_and_close(tmp_path, monkeypatch):
  real_fsync = corpus.os.fsync
  fail = {"on": False}

  def fsync(fd):
    if fail["on"]:
      raise OSError(5, "Input/output error")
    real_fsync(fd)

  monkeypatch.setattr(corpus.os, "fsync", fsync)
  path = tmp_path / "corpus.jsonl"
  w = corpus.CorpusWriter(path, sync_every=100, background_fsync=True)
  w.write(make(0))
  w.sync()  # This fsync succeeds in the background.
  fail["on"] = True
  w.write(make(1))
  w.sync()  # This one fails in the background thread ...
  w._fsyncs[-1].exception()  # (wait for it)
  with pytest.raises(OSError, match=f"{path}: fsync failed.*Input/output error") as e:
    w.sync()  # ... and is reported at the next sync.
  assert e.value.errno == 5
  w.write(make(2))
  w.sync()
  with pytest.raises(OSError, match="fsync failed"):
    w.close()  # The failure of the last background fsync is reported at close; the file is closed.
  assert w._f.closed
  fail["on"] = False
  assert [r["sample_index"] for r in corpus.read_corpus(path)] == [0, 1, 2]


def test_background_fsync_error_does_not_hide_the_error_in_flight(tmp_path, monkeypatch):
  monkeypatch.setattr(corpus.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left")))
  with pytest.raises(KeyError):
    with corpus.CorpusWriter(tmp_path / "c.jsonl", sync_every=1, background_fsync=True) as w:
      w.write(make(0))
      raise KeyError("the real error")
