"""Per-device memory of every pod layout's big-model programs: one JSON object (or a Markdown table).

  python launch/memory.py                          # every layout of configs/pods
  python launch/memory.py --layouts v5p-32_llama2  # some
  python launch/memory.py --markdown               # the table in launch/README.md
  python launch/memory.py --readme                 # ... written into launch/README.md
  python launch/memory.py --attention=xla          # as if auto fell back to XLA's attention

For each layout (configs/pods) and each stage it configures, the stage's config is built with
`pod=<layout>`, its device programs are built abstractly and lowered for the layout's device count
on simulated CPU devices (launch/programs.py; one subprocess per device count, since
XLA_FLAGS=--xla_force_host_platform_device_count must be set before JAX starts), and per device:
- `inputs`: the exact bytes of the program's arguments from their shardings: trained parameters,
  optimizer state, frozen models (a LoRA base, the online proxy, a scored model), the batch;
- `transient`: the estimate of launch/activations.py (residuals, one layer's working set, the
  loss chunk, gathered weights, gradients; the DPO sampler's KV cache);
- `total` = inputs + transient, against `budget` = the usable HBM less a 10% margin (XLA's
  fragmentation, collective buffers, the program itself). `fits`: total <= budget.
Sizes are GiB (2^30 bytes). Nothing is allocated and nothing is compiled; about a minute on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launch"))

import activations  # noqa: E402  pylint: disable=wrong-import-position
from configs import pods  # noqa: E402  pylint: disable=wrong-import-position

MARGIN = 0.10  # of the usable HBM, kept free beyond the estimate
GIB = 2 ** 30
README = REPO / "launch" / "README.md"
TABLE_START = "<!-- memory table: python launch/memory.py --markdown -->\n"
TABLE_END = "<!-- end of memory table -->"


def _gib(n: float) -> float:
  return round(n / GIB, 2)


def _program_row(program, layout: pods.Layout, config, attention: str) -> dict:
  """One program's memory on one device under `layout` (in this process's simulated devices)."""
  sizes = layout.mesh_sizes()
  tensor = sizes["tensor"]
  rows = program.rows // (sizes["data"] * sizes["fsdp"])  # rows over the batch axes
  cfg = program.models["model"]
  seq = config.data.seq_len
  chunk = config.train.loss_chunk if "train" in config else config.loss_chunk
  if program.kind == "train":
    transient = activations.train_transient(cfg, rows, seq, tensor, chunk, attention,
                                            program.bytes["params"], program.models.get("proxy"))
  else:
    transient = activations.forward_transient(cfg, rows, seq, tensor, chunk, attention)
  return _row(program.name, layout, rows, cfg, program.bytes, transient, program.kind == "train")


def _row(name: str, layout: pods.Layout, rows: int, cfg, inputs: dict, transient: dict,
         train: bool = False) -> dict:
  hw = pods.HARDWARE[layout.hardware]
  budget = hw.hbm_gib * GIB * hw.usable * (1 - MARGIN)
  total = sum(inputs.values()) + sum(transient.values())
  return {"program": name, "rows_per_device": rows, "remat": cfg.remat if train else "-",
          "lora_rank": cfg.lora_rank,
          "inputs": {k: _gib(v) for k, v in inputs.items()},
          "transient": {k: _gib(v) for k, v in transient.items()},
          "total": _gib(total), "budget": _gib(budget), "fits": bool(total <= budget)}


def _sample_row(layout: pods.Layout, config, reference) -> dict:
  """proxy_dpo's sampler: the proxy's weights and a KV cache of sample_batch prompts of up to
  seq_len tokens plus max_new_tokens (proxykd/models/sampling.py; estimated, not lowered)."""
  cfg = reference.models["model"]
  sizes = layout.mesh_sizes()
  tensor = sizes["tensor"]
  rows = max(config.dpo.sample_batch // (sizes["data"] * sizes["fsdp"]), 1)
  length = config.data.seq_len + config.dpo.max_new_tokens
  transient = {"kv_cache": activations.kv_cache_bytes(cfg, rows, length, tensor),
               "gathered": activations.gathered_bytes(cfg, tensor, trained=False),
               "logits": rows * cfg.vocab_size // tensor * 4 * 3}
  return _row("proxy_dpo/sample", layout, rows, cfg, {"frozen": reference.bytes["frozen"]}, transient)


def worker(names: list[str], attention: str = "") -> dict:
  """Rows of `names` (all with this process's device count); `attention`: the implementation the
  estimate assumes (default: what model.attention=auto runs on the layout's hardware)."""
  import importlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import programs  # pylint: disable=g-import-not-at-top
  out = {}
  for name in names:
    layout = pods.LAYOUTS[name]
    if jax.device_count() != layout.devices:
      raise SystemExit(f"{name}: needs {layout.devices} devices, this process has {jax.device_count()}")
    rows = []
    for stage in pods.STAGES:
      config = importlib.import_module(f"configs.{stage}").get_config(f"pod={name}")
      found = programs.stage_programs(stage, config, layout.proxy_block())
      implementation = attention or pods.HARDWARE[layout.hardware].attention
      rows += [_program_row(p, layout, config, implementation) for p in found]
      if stage == "proxy_dpo":
        rows.append(_sample_row(layout, config, found[1]))
    hw = pods.HARDWARE[layout.hardware]
    proxy, student = pods.PAIRS[layout.pair]
    out[name] = {"hardware": hw.name, "devices": layout.devices, "hosts": layout.hosts,
                 "hbm_gib": hw.hbm_gib, "usable": hw.usable, "mesh": layout.mesh_sizes(),
                 "proxy": proxy, "student": student, "programs": rows}
  return out


def measure(names: list[str], attention: str = "") -> dict:
  """{layout: its rows}, each group of layouts with one device count in its own subprocess."""
  by_devices: dict[int, list[str]] = {}
  for name in names:
    by_devices.setdefault(pods.LAYOUTS[name].devices, []).append(name)
  found = {}
  for devices, group in sorted(by_devices.items()):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([sys.executable, __file__, "--worker", "--layouts", ",".join(group),
                           f"--attention={attention}"],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
      raise SystemExit(f"launch/memory.py: {group} failed:\n{proc.stderr[-4000:]}")
    found.update(json.loads(proc.stdout.strip().splitlines()[-1]))
  return {name: found[name] for name in names}


def markdown(result: dict) -> str:
  """The table of launch/README.md."""
  lines = ["| layout | mesh d x f x t | program | rows/device | remat | inputs | transient | total "
           "| budget | fits |", "|---|---|---|---:|---|---:|---:|---:|---:|---|"]
  for name, layout in result["layouts"].items():
    mesh = " x ".join(str(layout["mesh"][a]) for a in ("data", "fsdp", "tensor"))
    for r in layout["programs"]:
      lines.append(f"| {name} | {mesh} | {r['program']} | {r['rows_per_device']} | {r['remat']} | "
                   f"{sum(r['inputs'].values()):.2f} | {sum(r['transient'].values()):.2f} | "
                   f"{r['total']:.2f} | {r['budget']:.2f} | {'yes' if r['fits'] else 'NO'} |")
  return "\n".join(lines)


def readme_table(text: str) -> str:
  """The table between the markers of launch/README.md's text."""
  start = text.index(TABLE_START) + len(TABLE_START)
  return text[start:text.index(TABLE_END)].strip()


def write_readme(table: str) -> None:
  text = README.read_text()
  start = text.index(TABLE_START) + len(TABLE_START)
  README.write_text(text[:start] + table + "\n" + text[text.index(TABLE_END):])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layouts", default=",".join(pods.LAYOUTS),
                      help="comma-separated layout names (default: all)")
  parser.add_argument("--markdown", action="store_true", help="print the README table instead")
  parser.add_argument("--readme", action="store_true", help="write the table into launch/README.md")
  parser.add_argument("--attention", default="", choices=("", "xla", "splash", "cudnn", "pallas_gpu"),
                      help="estimate attention as this implementation (default: auto's choice)")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  names = [n for n in args.layouts.split(",") if n]
  unknown = sorted(set(names) - set(pods.LAYOUTS))
  if unknown:
    parser.error(f"unknown layouts {unknown}; known: {sorted(pods.LAYOUTS)}")
  if args.worker:
    print(json.dumps(worker(names, args.attention)))
    return
  result = {"margin": MARGIN, "units": "GiB per device", "attention": args.attention or "auto",
            "layouts": measure(names, args.attention)}
  if args.readme:
    write_readme(markdown(result))
  print(markdown(result) if args.markdown or args.readme else json.dumps(result))


if __name__ == "__main__":
  main()
