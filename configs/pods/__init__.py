"""Named pod layouts: the paper's model pairs on TPU slices and multi-host H100s, as a variant flag.

  python main.py --config=configs/proxy_dpo.py:pod=v5p-32_llama2 --workdir=gs://bucket/run \
      --config.init_from=/mnt/weights/Llama-2-70b-hf

A layout `<slice>_<pair>` names the hardware and the model pair, `llama2` (the paper's: a
Llama-2-70B proxy, a Llama-2-7B student) or `llama3` (Llama-3.1-70B, Llama-3.1-8B), and sets for
each stage that holds a big model its mesh, global batch, gradient accumulation, rematerialisation
and LoRA. Slices: `v4-64` (Cloud TPU v4, 64 TensorCores = 32 chips on 8 hosts), `v5p-32` (v5p, 16
chips on 4 hosts), `h100x16` (2 hosts of 8 NVIDIA H100 80GB). Every layout:
- keeps the weights in float32 (`model.param_dtype`: precise LoRA and Adam updates) and computes in
  bfloat16 (`model.dtype`); the proxy trains LoRA adapters (rank 16 on every projection), the
  student trains all its weights;
- uses `data.seq_len=1024` in every stage (the paper's maximum length; cache_proxy's rows must be
  student_kd's) and exports the trained models' HF directories in bfloat16 (`export_dtype`);
- on TPU shards the weights over fsdp (the slice's ICI carries the per-layer gathers), with
  tensor=4 on v4's 32 GiB chips; on H100 it splits the model 8 ways inside a host (tensor, NVLink) and the batch across hosts
  (data), so only gradients cross the slower inter-host network.
Paths (`init_from`, `proxy`, ...) are never part of a layout. The per-device memory of each stage's
program under each layout is printed by `python launch/memory.py` and tested by
tests/test_launch_memory.py; the table is in launch/README.md.

This is a package rather than configs/pods.py because every configs/*.py is a stage.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from configs import common

NONE = "none"  # the flag's default: no layout


@dataclasses.dataclass(frozen=True)
class Hardware:
  """One accelerator kind, as the memory estimate needs it."""
  name: str
  hbm_gib: float  # memory per device
  devices_per_host: int
  attention: str  # what model.attention=auto runs there (proxykd/models/attention.py)
  usable: float = 1.0  # fraction of hbm_gib the process may allocate


HARDWARE = {
    "v4": Hardware("TPU v4", 32.0, 4, "splash"),
    "v5p": Hardware("TPU v5p", 95.0, 4, "splash"),
    # launch/gpu_multihost.sh sets XLA_PYTHON_CLIENT_MEM_FRACTION=0.92.
    "h100": Hardware("NVIDIA H100 80GB", 80.0, 8, "cudnn", usable=0.92),
}

# pair -> (proxy preset, student preset)
PAIRS = {"llama2": ("llama2_70b", "llama2_7b"), "llama3": ("llama3_70b", "llama3_8b")}

# The stages a layout configures (those that hold a big model).
STAGES = ("proxy_sft", "proxy_dpo", "calibrate", "cache_proxy", "student_kd")
LORA_RANK, LORA_ALPHA = 16, 32.0
SEQ_LEN = 1024


@dataclasses.dataclass(frozen=True)
class Layout:
  hardware: str  # a HARDWARE key
  devices: int
  pair: str  # a PAIRS key
  mesh: dict[str, int]
  proxy_remat: str
  student_remat: str
  # Global batches (rows of SEQ_LEN tokens): proxy_sft, proxy_dpo, the proxy's forward passes
  # (calibrate, cache_proxy) and student_kd; and each training stage's gradient accumulation.
  sft_batch: int
  dpo_batch: int
  score_batch: int
  student_batch: int
  sft_accum: int = 1
  dpo_accum: int = 1
  student_accum: int = 1
  dpo_sample_batch: int = 64  # prompts per sampling call of proxy_dpo

  def mesh_sizes(self) -> dict[str, int]:
    """The mesh's axis sizes with the -1 filled in."""
    fixed = 1
    for size in self.mesh.values():
      fixed *= size if size > 0 else 1
    return {axis: size if size > 0 else self.devices // fixed for axis, size in self.mesh.items()}

  @property
  def hosts(self) -> int:
    return self.devices // HARDWARE[self.hardware].devices_per_host

  def proxy_block(self) -> ml_collections.ConfigDict:
    """`config.model` of the proxy stages: the proxy's shape with the run fields that apply."""
    return common.model_config(PAIRS[self.pair][0], dtype="bfloat16", param_dtype="float32",
                               remat=self.proxy_remat, lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA)

  def student_block(self) -> ml_collections.ConfigDict:
    return common.model_config(PAIRS[self.pair][1], dtype="bfloat16", param_dtype="float32",
                               remat=self.student_remat)

  def overrides(self, stage: str) -> dict[str, Any]:
    """{dotted config key: value} for `stage` (one of STAGES)."""
    mesh = ml_collections.ConfigDict(dict(self.mesh))
    common_keys = {"mesh": mesh, "data.seq_len": SEQ_LEN}
    trained = {**common_keys, "export_dtype": "bfloat16"}  # the HF export at the end: half the bytes
    if stage == "proxy_sft":
      return {**trained, "model": self.proxy_block(), "train.batch_size": self.sft_batch,
              "train.grad_accum": self.sft_accum}
    if stage == "proxy_dpo":
      return {**trained, "model": self.proxy_block(), "train.batch_size": self.dpo_batch,
              "train.grad_accum": self.dpo_accum, "dpo.sample_batch": self.dpo_sample_batch}
    if stage in ("calibrate", "cache_proxy"):
      return {**common_keys, "batch_size": self.score_batch}
    if stage == "student_kd":
      return {**trained, "model": self.student_block(), "train.batch_size": self.student_batch,
              "train.grad_accum": self.student_accum}
    raise ValueError(f"pod layouts configure {STAGES}, not {stage!r}")


def _pair_layouts(slice_name: str, **fields) -> dict[str, Layout]:
  return {f"{slice_name}_{pair}": Layout(pair=pair, **fields) for pair in PAIRS}


LAYOUTS: dict[str, Layout] = {
    # 32 chips x 32 GiB: the 70B proxy's float32 weights are 8 GiB a chip. tensor=4 so that a
    # layer's gathered weights and the 128k-vocabulary tables are a quarter each; micro-batches of
    # 2 rows a chip (grad_accum) keep the residuals small.
    **_pair_layouts("v4-64", hardware="v4", devices=32, mesh=dict(data=1, fsdp=-1, tensor=4),
                    proxy_remat="full", student_remat="full", sft_batch=64, sft_accum=4,
                    dpo_batch=32, dpo_accum=2, score_batch=32, student_batch=64, student_accum=4),
    # 16 chips x 95 GiB: room to keep the projections (remat=minimal) of the proxy's layers.
    **_pair_layouts("v5p-32", hardware="v5p", devices=16, mesh=dict(data=1, fsdp=-1, tensor=1),
                    proxy_remat="save_qkv_proj", student_remat="minimal", sft_batch=64,
                    dpo_batch=32, score_batch=64, student_batch=64),
    # 2 hosts x 8 H100: tensor=8 inside a host, the batch over the two hosts.
    **_pair_layouts("h100x16", hardware="h100", devices=16, mesh=dict(data=-1, fsdp=1, tensor=8),
                    proxy_remat="full", student_remat="full", sft_batch=16, dpo_batch=16,
                    score_batch=16, student_batch=16, dpo_sample_batch=32),
}


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  node = config
  for name in parents:
    node = node[name]
  if leaf not in node:
    raise KeyError(f"pod layouts: the config has no key {dotted!r}")
  node[leaf] = value


def apply(config: ml_collections.ConfigDict, name: str, stage: str) -> ml_collections.ConfigDict:
  """`config` with the settings of pod layout `name` for `stage` (`none`: unchanged)."""
  if name == NONE:
    return config
  if name not in LAYOUTS:
    raise common.VariantError(f"unknown pod layout {name!r}; known: {', '.join(sorted(LAYOUTS))}")
  for key, value in LAYOUTS[name].overrides(stage).items():
    _set(config, key, value)
  return config
