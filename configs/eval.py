"""Stage `eval`: GSM8K, BBH, held-out synthetic problems, any prompt source, multiple choice by
log-likelihood, held-out teacher NLL and the estimator's fidelity, for one of our checkpoints or
any local HF directory.

  python main.py --config=configs/eval.py --config.model=CHECKPOINT_OR_HF_DIR --workdir=DIR
  python main.py --config=configs/eval.py:runlocal,tasks=synthetic+heldout --config.model=DIR/proxy_dpo/hf --workdir=DIR
  python main.py --config=configs/eval.py:tasks=choice --config.choice.path=arc_challenge.jsonl ...

Writes DIR/eval/ (or --config.output): results.json, results.md, predictions/<task>.jsonl (prompt, output, extracted
answer, gold, correct). Greedy decoding throughout (the paper's setting). Variant flags: runlocal
(limits for a CPU smoke run), tasks=<tasks joined by +>, mesh=<preset>.
"""
import ml_collections

from configs import common
from proxykd.data import pipeline, split

TASKS = ("gsm8k", "bbh", "synthetic", "prompts", "choice", "heldout", "fidelity")
GSM_SYSTEM = "Solve the problem step by step. End with a line '#### <answer>'."


def get_config(arg=None):
  # Variant flags are comma-separated, so tasks=gsm8k+bbh names several tasks there.
  arg = common.parse_arg(arg, runlocal=False, tasks="gsm8k+bbh", mesh="fsdp")
  c = ml_collections.ConfigDict()
  c.stage = "eval"
  c.model = ""  # One of our checkpoints (root or step) or a Hugging Face model directory.
  c.tokenizer = ""  # Default: the HF directory, or the tokenizer the checkpoint records.
  c.name = ""  # The run's label in results and reports; default: from the model path.
  # Where results go; default <workdir>/eval. E.g. DIR/student_sft/eval for one of several students
  # (the report then takes DIR/student_sft as a run).
  c.output = ""
  c.dtype = ""  # Compute dtype override (float32 | bfloat16); default: the model's (auto).
  c.tasks = arg.tasks.replace("+", ",")  # Comma-separated, of: gsm8k, bbh, synthetic, prompts, choice, heldout, fidelity.
  c.limit = 0  # Items per task (BBH: per BBH task); 0 = all.
  c.batch_size = 64  # Prompts per generation call (padded to a multiple of the mesh's batch axes).
  c.score_batch = 8  # Rows per scoring call.
  c.loss_chunk = 256  # Positions per lm_head chunk when scoring (memory: rows x chunk x vocab).
  c.progress = True
  c.mesh = common.mesh_config(arg.mesh)

  c.gsm8k = ml_collections.ConfigDict(dict(
      data_dir="",  # Root holding gsm8k/; default ../shared/data beside the repository.
      split="test",
      shots=0,  # 0: zero-shot, as in the paper; k: the first k train problems as chat turns first.
      system_prompt=GSM_SYSTEM,
      max_new_tokens=512))
  c.bbh = ml_collections.ConfigDict(dict(
      data_dir="", tasks="all",  # "all" or comma-separated BBH task names
      shots=3,  # 3: the cot-prompts chain-of-thought exemplars; 0: zero-shot chain of thought
      max_new_tokens=512))
  c.synthetic = ml_collections.ConfigDict(dict(
      num=200, split="heldout", seed=12345,  # the synthetic teacher's generator
      system_prompt=GSM_SYSTEM, max_new_tokens=256))
  # Any collect-style prompt source (file, tfds:NAME/CONFIG:SPLIT, gsm8k, bbh, synthetic) with the
  # gold answer in a meta field (list it in meta_fields).
  c.prompts = ml_collections.ConfigDict(dict(
      name="prompts",  # the task's name in results
      source="file", path="", json_field="", prompt_field="question", messages_field="",
      meta_fields="answer", data_dir="", split="test", tasks="all", cot=False, num=200, seed=0,
      offset=0, limit=0,
      answer_field="answer",
      answer_format="gsm8k",  # gsm8k | choice | binary | number | text (proxykd/eval/answers.py)
      labels="",  # binary: the two labels, comma-separated
      system_prompt="", stop="",  # stop: comma-separated stop strings
      max_new_tokens=512))
  c.choice = ml_collections.ConfigDict(dict(
      path="",  # a multiple-choice JSONL file, or a directory of them (each a benchmark by name)
      system_prompt=""))
  # fidelity: on the held-out split, KL(teacher || .) and top-1 agreement of the prior, the proxy,
  # the posterior and the evaluated model, when the black box is one of our models (its weights).
  c.fidelity = ml_collections.ConfigDict(dict(
      teacher_model="",  # the teacher's weights: the checkpoint or HF directory serve_teacher served
      proxy="",  # the aligned proxy; default proxy_dpo's final proxy, else proxy_sft's
      prior="",  # a prior directory; default calibrate/chosen.json's, else <workdir>/prior, else
      prior_split="distill",  # ... counted here on this split of the corpus
      # kappa, m, tau, order, smoothing, k, floor: from <workdir>/calibrate/chosen.json when it exists
      # and from_calibration, else these.
      from_calibration=True, kappa=1.0, m=1.0, tau=1.0, order=3, smoothing="wb", k=32, floor=1e-6,
      temperature=-1.0, top_p=-1.0,  # the teacher's sampling; -1: as the held-out records say
      student=True))  # also the evaluated model (config.model) as an estimate
  # heldout: the teacher corpus' held-out split (as the training stages split it): NLL and top-1
  # agreement of the model on the teacher's tokens.
  c.corpus = ""  # default <workdir>/collect/corpus.jsonl
  c.split = split.default_config()
  # Tokenisation and row length of log-likelihood scoring (choice, heldout, fidelity), as in training.
  c.data = pipeline.default_config()
  c.data.update(seq_len=1024, truncation="truncate_prompt", cache=False)
  if arg.runlocal:
    c.limit = 16
    c.batch_size = 16
    c.data.seq_len = 256
    c.gsm8k.max_new_tokens = 128
    c.bbh.update(tasks="boolean_expressions,date_understanding,object_counting", max_new_tokens=64)
    c.synthetic.update(num=64, max_new_tokens=160)
  return c
