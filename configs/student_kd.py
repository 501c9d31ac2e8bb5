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
Variant flags: baseline=<name>, mode=online|offline, runlocal, model=<preset>, mesh=<preset>.
"""
import ml_collections

from configs import common
from proxykd.data import pipeline, split
from proxykd.train import optimizer

BASELINES = ("posterior", "sft", "proxykd", "proxykd_unweighted", "prior_only", "unaligned",
             "whitebox")


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, baseline="posterior", mode="online", model="tiny",
                         mesh="fsdp")
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
  return config
