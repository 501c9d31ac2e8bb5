"""Collect teacher responses into <workdir>/collect/corpus.jsonl from any OpenAI-compatible API.

  python main.py --config=configs/collect.py:runlocal --workdir=DIR     # demo: local synthetic teacher
  OPENAI_API_KEY=... python main.py --config=configs/collect.py:source=gsm8k --workdir=DIR \
      --config.teacher.base_url=https://api.openai.com/v1 --config.teacher.model=gpt-4o-mini
  ... add `--config.batch.enabled=True` for the Batch API (half price, resumable).

`teacher.base_url="local"` starts serve_teacher (configs/serve_teacher.py, with `local.*` below) on a
free loopback port for the run and talks to it over HTTP, so the demo needs no key.
"""
import ml_collections

from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, source="synthetic", batch=False, n=1, top_logprobs=0)
  c = ml_collections.ConfigDict()
  c.stage = "collect"
  c.output = ""  # Corpus path; default <workdir>/collect/corpus.jsonl (local paths: it is fsynced).
  c.progress = True

  c.prompts = ml_collections.ConfigDict(dict(
      source=arg.source,  # synthetic | gsm8k | bbh | file | tfds:NAME[/CONFIG][:SPLIT]
      path="",  # source=file: a .jsonl, .json or .parquet file
      json_field="",  # .json whose list of rows sits under this key
      prompt_field="question",  # the column holding the user message text ...
      messages_field="",  # ... or a column already holding an OpenAI chat list
      meta_fields="",  # comma-separated columns copied into each record's `meta`
      data_dir="",  # gsm8k/bbh root (default ../shared/data beside the repository); tfds: its data_dir
      split="train",  # gsm8k: train|test; synthetic: train|heldout; tfds: when the source names none
      tasks="all",  # bbh: "all" or comma-separated task names
      cot=False,  # bbh: put the task's 3-shot chain-of-thought prompt first
      num=2000,  # synthetic: how many problems
      seed=0,  # synthetic: generator seed
      offset=0, limit=0))  # a slice of the prompts; limit 0 = all

  c.teacher = ml_collections.ConfigDict(dict(
      base_url="local",  # an OpenAI-compatible /v1 URL, or "local" (spawn serve_teacher)
      model="synthetic-gsm",
      api_key_env="OPENAI_API_KEY",  # the NAME of the env variable holding the key (never the key)
      system_prompt="Solve the problem step by step. End with a line '#### <answer>'.",
      temperature=0.7, top_p=1.0, max_tokens=512,  # max_tokens 0: the server's default
      max_tokens_key="max_tokens",  # or max_completion_tokens for APIs that want it
      n=arg.n,  # samples per prompt
      seed=-1,  # -1: none
      stop=(),  # up to 4 stop strings
      top_logprobs=arg.top_logprobs,  # 0-20; > 0 asks for logprobs and stores them
      timeout_s=120.0,  # per request
      connect_timeout_s=10.0))  # per connection attempt

  c.limits = ml_collections.ConfigDict(dict(
      concurrency=32, rpm=0, tpm=0,  # 0: unlimited
      ramp_up_s=0.25,  # start the concurrent workers spread over this many seconds
      max_retries=8, backoff_base_s=0.5, backoff_max_s=30.0, retry_after_max_s=120.0,
      max_consecutive_failures=100,  # stop when this many requests in a row failed for good (0: never)
      connect_grace_s=5.0,  # stop when no request could connect for this long and none ever got an answer
      sync_every=8))  # fsync the corpus every this many records

  c.pricing = ml_collections.ConfigDict(dict(input_per_1m=0.0, output_per_1m=0.0, batch_discount=0.5))

  c.batch = ml_collections.ConfigDict(dict(
      enabled=arg.batch, poll_s=30.0, max_requests=50000, completion_window="24h", timeout_h=25.0))

  # serve_teacher settings when teacher.base_url == "local" (see configs/serve_teacher.py).
  c.local = ml_collections.ConfigDict(dict(backend="synthetic", hf_dir="", checkpoint="", tokenizer="",
                                           latency_s=0.0, error_rate=0.0, drop_rate=0.0, seed=0,
                                           startup_timeout_s=60.0))

  if arg.runlocal:
    c.prompts.num = 320  # The synthetic teacher answers ~300 requests/s: a couple of seconds.
    c.limits.concurrency = 8
    c.batch.poll_s = 0.2
  return c
