"""Hugging Face checkpoint interop: load an HF model directory into our params, export ours back.

Loading is tensor by tensor: every parameter is built with `jax.make_array_from_callback`, whose
callback reads only the slice that one device holds, straight from the memory-mapped safetensors
file. So a 70B checkpoint never has a second full copy in host memory, and each shard lands on its
device with its final sharding. Export streams the other way: one tensor on the host at a time.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from proxykd import paths
from proxykd import hosts
from proxykd.models import lora, safetensors_io
from proxykd.models.config import ModelConfig, UnsupportedModelError, from_hf_config, to_hf_config
from proxykd.models.transformer import abstract_params

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                   "added_tokens.json", "generation_config.json")
_IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Mapping:
  """How one of our parameters relates to HF tensors.

  `hf` is the HF tensor name (with `{i}` for the layer when `stacked`); `to_ours` turns an HF
  tensor into ours (for one layer when stacked) and `to_hf` is its inverse.
  """
  path: tuple[str, ...]
  hf: str
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  stacked: bool = True


def _mappings(cfg: ModelConfig) -> list[_Mapping]:
  e, h, kvh, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  same = lambda w: w
  layer = "model.layers.{i}."

  def heads_in(n):  # HF [n*d, e] -> ours [e, n, d]
    return (lambda w: w.T.reshape(e, n, d), lambda k: k.reshape(e, n * d).T)

  def bias(n):
    return (lambda b: b.reshape(n, d), lambda b: b.reshape(n * d))

  m = [
      _Mapping(("embedding",), "model.embed_tokens.weight", same, same, stacked=False),
      _Mapping(("final_norm", "scale"), "model.norm.weight", same, same, stacked=False),
      _Mapping(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight", same, same),
      _Mapping(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", same, same),
      _Mapping(("layers", "attn", "q", "kernel"), layer + "self_attn.q_proj.weight", *heads_in(h)),
      _Mapping(("layers", "attn", "k", "kernel"), layer + "self_attn.k_proj.weight", *heads_in(kvh)),
      _Mapping(("layers", "attn", "v", "kernel"), layer + "self_attn.v_proj.weight", *heads_in(kvh)),
      _Mapping(("layers", "attn", "o", "kernel"), layer + "self_attn.o_proj.weight",
               lambda w: w.T.reshape(h, d, e), lambda k: k.reshape(h * d, e).T),
      _Mapping(("layers", "mlp", "gate", "kernel"), layer + "mlp.gate_proj.weight", np.transpose, np.transpose),
      _Mapping(("layers", "mlp", "up", "kernel"), layer + "mlp.up_proj.weight", np.transpose, np.transpose),
      _Mapping(("layers", "mlp", "down", "kernel"), layer + "mlp.down_proj.weight", np.transpose, np.transpose),
  ]
  if cfg.qkv_bias:
    m += [
        _Mapping(("layers", "attn", "q", "bias"), layer + "self_attn.q_proj.bias", *bias(h)),
        _Mapping(("layers", "attn", "k", "bias"), layer + "self_attn.k_proj.bias", *bias(kvh)),
        _Mapping(("layers", "attn", "v", "bias"), layer + "self_attn.v_proj.bias", *bias(kvh)),
    ]
  if not cfg.tie_word_embeddings:
    m.append(_Mapping(("lm_head",), "lm_head.weight", np.transpose, np.transpose, stacked=False))
  return m


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  else:
    yield prefix, tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


class _Checkpoint:
  """The tensors of an HF directory, across one or many safetensors files."""

  def __init__(self, directory: epath.Path):
    self.directory = directory
    index = directory / "model.safetensors.index.json"
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(p.name for p in directory.glob("*.safetensors"))
      if not files:
        raise FileNotFoundError(
            f"{directory}: no *.safetensors files (PyTorch .bin checkpoints are not supported; "
            "convert them with transformers' save_pretrained(safe_serialization=True))")
      weight_map = None
    self.files = {name: safetensors_io.SafetensorsFile(os.fspath(directory / name)) for name in files}
    self.where = weight_map or {k: n for n, f in self.files.items() for k in f.keys()}

  def get(self, name: str) -> np.ndarray:
    if name not in self.where:
      raise KeyError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
    return self.files[self.where[name]].get(name)


def read_hf_config(directory: epath.PathLike, **overrides) -> ModelConfig:
  path = epath.Path(directory) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path}: not found; is {directory} a Hugging Face model directory?")
  return from_hf_config(json.loads(path.read_text()), source=os.fspath(path), **overrides)


def load_hf(directory: epath.PathLike, shardings=None, **config_overrides):
  """Load an HF model directory -> (params, ModelConfig).

  `shardings`: a pytree of `jax.sharding.Sharding` matching our params (e.g. from
  `logical_to_sharding(logical_axes(cfg), mesh)`), or None for the default device. Config fields
  such as dtype/param_dtype/remat/lora_rank can be overridden. A directory that is not local
  (gs://...) is copied to a temporary local one first (its JSON and safetensors files: the tensors
  are read from memory maps), removed once the parameters are built.
  """
  directory = epath.Path(directory)
  cfg = read_hf_config(directory, **config_overrides)
  if not paths.is_local(directory):  # Memory maps need local files: a temporary copy, removed after.
    with paths.local_dir(directory, ("*.json", "*.safetensors"), prefix="proxykd-hf-") as local:
      return load_hf(local, shardings, **config_overrides)
  ckpt = _Checkpoint(directory)
  mappings = _mappings(cfg)
  expected = {m.hf.format(i=i) for m in mappings for i in (range(cfg.num_layers) if m.stacked else [0])}
  unexpected = sorted(k for k in ckpt.where if k not in expected
                      and not k.endswith(_IGNORED_HF_TENSORS)
                      and not (cfg.tie_word_embeddings and k == "lm_head.weight"))
  if unexpected:
    raise UnsupportedModelError(
        f"{directory}: tensors this decoder does not know: {unexpected[:5]}"
        f"{' ...' if len(unexpected) > 5 else ''}")

  abstract = abstract_params(cfg)
  flat_abstract = dict(_flatten(abstract))
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params: dict = {}
  flat_shardings = dict(_flatten(shardings)) if shardings is not None else {}
  for m in mappings:
    target = flat_abstract[m.path]
    dtype = target.dtype

    def read(index, m=m, dtype=dtype):
      if not m.stacked:
        return np.asarray(m.to_ours(ckpt.get(m.hf))[index], dtype=dtype)
      layers = range(cfg.num_layers)[index[0]]
      return np.stack([np.asarray(m.to_ours(ckpt.get(m.hf.format(i=i)))[index[1:]], dtype=dtype)
                       for i in layers])

    first = ckpt.get(m.hf.format(i=0))
    want = m.to_hf(np.empty(target.shape[1:] if m.stacked else target.shape, np.float32)).shape
    if first.shape != want:
      raise UnsupportedModelError(f"{directory}: tensor {m.hf.format(i=0)} has shape {first.shape}, "
                                  f"config.json implies {want}")
    sharding = flat_shardings.get(m.path, default)
    _set(params, m.path, jax.make_array_from_callback(target.shape, sharding, read))
  if cfg.lora_rank:  # Fresh adapters (B = 0, so the loaded model is unchanged), nothing else.
    adapter_sh = lora.adapters_of(shardings) if shardings is not None else None
    params = lora.combine(lora.fresh_adapters(cfg, adapter_sh), params)
  return params, cfg


def export_hf(params, cfg: ModelConfig, out_dir: epath.PathLike, *, tokenizer_dir=None,
              dtype: str = "float32", max_shard_bytes: int = 4 << 30) -> epath.Path:
  """Write `params` as an HF directory (config.json, safetensors shards + index, tokenizer files).

  LoRA adapters must be merged first (proxykd.models.lora). Streams one tensor at a time, through
  etils.epath: `out_dir` and `tokenizer_dir` may be remote (gs://...), with no local copy.
  """
  out_dir = epath.Path(out_dir)
  flat = dict(_flatten(params))
  mappings = _mappings(cfg)
  unknown = sorted("/".join(p) for p in flat if p not in {m.path for m in mappings})
  if unknown:
    raise ValueError(f"export_hf: parameters with no HF name: {unknown[:5]} "
                     "(LoRA adapters must be merged into the base weights before export)")
  np_dtype = np.dtype(jnp.dtype(dtype))
  tensors = []  # (name, shape, dtype, produce)
  for m in mappings:
    x = flat[m.path]
    if m.stacked:
      for i in range(cfg.num_layers):
        shape = m.to_hf(np.empty(x.shape[1:], np.float32)).shape
        tensors.append((m.hf.format(i=i), shape, np_dtype,
                        lambda x=x, i=i, m=m: m.to_hf(hosts.to_host(x[i]))))
    else:
      shape = m.to_hf(np.empty(x.shape, np.float32)).shape
      tensors.append((m.hf, shape, np_dtype, lambda x=x, m=m: m.to_hf(hosts.to_host(x))))

  shards, size = [[]], 0
  for t in tensors:
    nbytes = int(np.prod(t[1])) * np_dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += nbytes
  if not hosts.is_main():  # Every host takes part in the gathers; the main host writes.
    for shard in shards:
      for t in shard:
        t[3]()
    return out_dir
  out_dir.mkdir(parents=True, exist_ok=True)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
  weight_map, total = {}, 0
  for name, shard in zip(names, shards):
    safetensors_io.write_file(out_dir / name, shard)
    for t in shard:
      weight_map[t[0]] = name
      total += int(np.prod(t[1])) * np_dtype.itemsize
  if len(shards) > 1:
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

  token_ids = {}
  if tokenizer_dir is not None:
    tokenizer_dir = epath.Path(tokenizer_dir)
    for fname in TOKENIZER_FILES:
      if (tokenizer_dir / fname).exists():
        paths.copy_file(tokenizer_dir / fname, out_dir / fname)
    token_ids = _special_token_ids(tokenizer_dir)
  hf_config = to_hf_config(cfg, torch_dtype=dtype, **token_ids)
  (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
  return out_dir


def _special_token_ids(tokenizer_dir: epath.Path) -> dict[str, int | None]:
  from proxykd.models.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  tok = load_tokenizer(tokenizer_dir)
  return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
          "pad_token_id": tok.pad_token_id}
