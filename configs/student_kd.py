"""Stage `student_kd`: distil the student on D_s from the teacher's tokens and the estimate p̂.

  python main.py --config=configs/student_kd.py --workdir=DIR                 # the Bayesian posterior
  python main.py --config=configs/student_kd.py:baseline=sft --workdir=DIR    # a baseline (below)
  python main.py --config=configs/student_kd.py:mode=offline --workdir=DIR    # from DIR/cache_proxy
  python main.py --config=configs/student_kd.py --workdir=DIR \
      --config.init_from=/models/Llama-2-7b-hf --config.proxy=/models/aligned-70b \
      --config.mesh.fsdp=-1 --config.mesh.tensor=8

Loss per response token: NLL(y) + kd.alpha * w * D(p̂ || student), p̂ = (kappa pi + e_y + m q) /
(kappa + 1 + m) with kappa, m, tau from DIR/calibrate/chosen.json unless set here.

Baselines (`baseline=`), each at the same initialisation and token budget, each in its own
directory DIR/student_<baseline>/ (the default writes DIR/student_kd/):
  posterior           the Bayesian posterior (default)
  sft                 SFT on the teacher's text (alpha = 0)
  proxykd             Proxy-KD: pure proxy soft labels (m = inf), weighted
  proxykd_unweighted  Proxy-KD with w = 1
  prior_only          prior-smoothed labels (m = 0)
  unaligned           Proxy-KD from the warm-up proxy (proxy_sft) instead of the aligned one (TAKD-like)
  whitebox            simulation only: the teacher is one of our models (config.teacher_model), its
                      exact next-token distribution is p̂ (the estimator's upper bound)
Variant flags: baseline=<name>, mode=online|offline, runlocal, model=<preset>, mesh=<preset>,
pod=<layout> (a pod layout of configs/pods; with it `pipeline=auto` is off: launch/README.md).
"""
import ml_collections

from configs import calibrate, collect, common, eval as eval_config, pods, prior, proxy_dpo
from configs import proxy_sft, tokenizer
from proxykd.data import pipeline, split
from proxykd.train import optimizer

BASELINES = ("posterior", "sft", "proxykd", "proxykd_unweighted", "prior_only", "unaligned",
             "whitebox")


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, baseline="posterior", mode="online", model="tiny",
                         mesh="fsdp", pipeline="auto", pod=pods.NONE)
  if arg.baseline not in BASELINES:
    raise common.VariantError(f"configs/student_kd.py: baseline={arg.baseline!r}; choose one of "
                              f"{list(BASELINES)}")
  config = ml_collections.ConfigDict()
  config.stage = "student_kd"
  config.run_name = "student_kd" if arg.baseline == "posterior" else f"student_{arg.baseline}"
  config.corpus = ""  # default <workdir>/collect/corpus.jsonl
  config.split_name = "distill"  # D_s
  config.tokenizer = ""  # default: as proxy_sft; must equal the proxy's (refused otherwise)
  config.init_from = ""  # the student's weights (HF dir or checkpoint); empty: random config.model
  config.model = common.model_config(arg.model)
  # The aligned proxy (checkpoint or HF dir); default proxy_dpo's final proxy, else proxy_sft's.
  config.proxy = ""
  config.teacher_model = ""  # baseline=whitebox: the teacher's own weights (checkpoint or HF dir)
  config.prior = ""  # default <workdir>/prior
  config.cache = ""  # kd.mode=offline: default <workdir>/cache_proxy
  config.mesh = common.mesh_config(arg.mesh)
  config.split = split.default_config()
  config.data = pipeline.default_config()
  config.optim = optimizer.default_config()
  config.train = ml_collections.ConfigDict(dict(
      steps=1000, epochs=0.0, batch_size=16, grad_accum=1, seed=0, loss_chunk=256,
      log_every=10, eval_every=200, save_every=200, keep=3, async_save=True, progress_bar=True))
  config.kd = ml_collections.ConfigDict(dict(
      alpha=100.0,  # paper: 100
      divergence="forward_kl",  # forward_kl | reverse_kl | jsd | skew_kl | tvd
      div_param=-1.0,  # jsd's beta / skew_kl's lambda; < 0: their defaults (0.5 / 0.1)
      mode=arg.mode,  # online (the proxy runs in the step) | offline (the cache_proxy stage's top-k)
      weighted=True,  # sample weights w_i (Eq. 9); False: w = 1
      # The estimator; < 0: from <workdir>/calibrate/chosen.json (kappa, m, tau, prior settings).
      kappa=-1.0, m=-1.0, tau=-1.0,  # m may be inf (pure proxy)
      prior_k=32,  # prior tokens per position (the prior's top-K)
      teacher_topk=20))  # the teacher's top_logprobs (up to this many) override p̂ where the corpus has them; 0: off
  config.export = True  # <workdir>/<run_name>/hf
  config.export_dtype = "float32"
  config.wandb = ml_collections.ConfigDict(dict(project="", entity="", name=""))
  if arg.baseline == "sft":
    config.kd.alpha = 0.0
  elif arg.baseline in ("proxykd", "proxykd_unweighted", "unaligned", "whitebox"):
    config.kd.update(kappa=0.0, m=float("inf"), tau=1.0 if arg.baseline == "whitebox" else -1.0)
    config.kd.weighted = arg.baseline in ("proxykd", "unaligned")
  elif arg.baseline == "prior_only":
    config.kd.m = 0.0
  if arg.runlocal:
    config.data.seq_len = 256
    config.train.update(steps=60, batch_size=4, log_every=10, eval_every=30, save_every=30)
    config.optim.update(lr=1e-3, warmup_steps=5)
  if arg.pipeline not in ("auto", "on", "off"):
    raise common.VariantError(f"configs/student_kd.py: pipeline={arg.pipeline!r}; choose auto, on or off")
  enabled = arg.pipeline == "on" or (arg.pipeline == "auto" and arg.baseline == "posterior"
                                     and not arg.runlocal and arg.pod == pods.NONE)
  config.pipeline = demo_pipeline(config) if enabled else ml_collections.ConfigDict({"enabled": False})
  return pods.apply(config, arg.pod, config.stage)


def demo_pipeline(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The built-in demo, end to end, in one command (README command 1): every stage this student
  needs that has not run in the workdir (default runs/demo) runs first with these settings, then
  the student, an SFT baseline from the same initialisation and token budget, the evaluation of
  both and a comparison table. Each step is a full stage config, overridable from the command line
  (e.g. --config.pipeline.steps.proxy_dpo.dpo.rounds=4). Sized for a 2-core CPU: the proxy is a
  larger model than the student and sees more of the teacher's data (D_w, then D_p in DPO), so it
  knows more than the student, which is what distillation transfers (METHOD.md)."""
  config.workdir = "runs/demo"  # when --workdir is not given
  config.data.seq_len = 256
  config.split.heldout = 0.1  # ~60 held-out prompts: enough to compare students and calibrate
  config.train.update(steps=400, batch_size=8, log_every=20, eval_every=100, save_every=100)
  config.optim.update(lr=1e-3, warmup_steps=20)
  steps = ml_collections.ConfigDict()
  steps.collect = collect.get_config("runlocal")
  steps.collect.prompts.num = 600  # the synthetic teacher answers ~300 requests/s
  steps.collect.teacher.top_logprobs = 5  # exercises the teacher top-k override of p̂
  # Seeded (each sample with seed + its index): the demo's corpus, and so its table, is the same on
  # every machine. Temperature 1: the teacher's phrasing varies, as a real teacher's does, so its
  # full distribution carries what one sampled answer does not (what distillation transfers).
  steps.collect.teacher.update(seed=0, temperature=1.0)
  steps.collect.progress = False
  steps.tokenizer = tokenizer.get_config()
  steps.prior = prior.get_config()
  steps.proxy_sft = proxy_sft.get_config("runlocal")
  # The proxy: twice the student's width and depth.
  steps.proxy_sft.model.update(hidden_size=128, num_layers=4, intermediate_size=352)
  steps.proxy_sft.train.update(steps=150, batch_size=8, eval_every=50, save_every=50)
  steps.proxy_dpo = proxy_dpo.get_config("runlocal")
  steps.calibrate = calibrate.get_config("runlocal")
  for step in steps.values():  # every stage splits the corpus the same way
    if "split" in step:
      step.split = config.split
  # The prior is queried on the student's rows: same tokenisation.
  steps.prior.data = config.data
  steps.calibrate.data = config.data
  evaluation = eval_config.get_config("runlocal")
  evaluation.limit = 64  # items per task (the held-out split has ~60 prompts)
  # Held-out synthetic problems, a GSM8K slice, and the NLL of held-out teacher text.
  evaluation.tasks = "synthetic,gsm8k,heldout"
  evaluation.split = config.split
  return ml_collections.ConfigDict(dict(
      enabled=True,
      rerun="",  # a step to run again (it and every later step; old outputs kept in .rerun/)
      order=("collect", "tokenizer", "prior", "proxy_sft", "proxy_dpo", "calibrate"),
      steps=steps,
      baseline="sft",  # the student_<baseline> run compared with the distilled student
      eval=evaluation))
