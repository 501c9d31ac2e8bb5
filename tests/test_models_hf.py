"""Our decoder against transformers' reference implementation, and HF import/export."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_python
from hf_reference import hf_logits, make_hf_model
from proxykd.models import Transformer, UnsupportedModelError, hf_io

TOKENS = np.random.RandomState(0).randint(0, 128, size=(2, 24))
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _ours(directory, tokens=TOKENS, **overrides):
  params, cfg = hf_io.load_hf(directory, **overrides)
  return np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(tokens))), params, cfg


@pytest.mark.parametrize("family,overrides", [
    ("llama", dict(rope_parameters=LLAMA3_ROPE)),  # Llama-3: GQA + llama3 rope scaling.
    ("llama", dict(num_key_value_heads=4, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                          "rope_theta": 10000.0})),
    ("qwen2", dict(tie_word_embeddings=True)),  # q/k/v biases, tied embeddings.
    ("mistral", dict(sliding_window=None, head_dim=32)),  # explicit head_dim != hidden/heads.
])
def test_logits_match_transformers(tmp_path, family, overrides):
  reference = make_hf_model(tmp_path, family, **overrides)
  ours, _, cfg = _ours(tmp_path)
  assert cfg.model_type == family
  np.testing.assert_array_less(np.abs(ours - hf_logits(reference, TOKENS)).max(), 1e-4)


def test_bfloat16_checkpoint_loads(tmp_path):
  """bf16 safetensors (what most checkpoints are) read correctly into float32 params."""
  make_hf_model(tmp_path, "llama", dtype="bfloat16")
  import transformers
  reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
  ours, params, _ = _ours(tmp_path)
  assert params["embedding"].dtype == jnp.float32
  np.testing.assert_array_less(np.abs(ours - hf_logits(reference, TOKENS)).max(), 1e-4)


def test_export_reloads_in_transformers(tmp_path):
  make_hf_model(tmp_path / "src", "qwen2")
  ours, params, cfg = _ours(tmp_path / "src")
  # Several shards + index, to cover the multi-file layout both ways.
  hf_io.export_hf(params, cfg, tmp_path / "out", dtype="float32", max_shard_bytes=64_000)
  assert (tmp_path / "out" / "model.safetensors.index.json").exists()
  import transformers
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  np.testing.assert_array_less(np.abs(hf_logits(reloaded, TOKENS) - ours).max(), 1e-5)
  again, _, _ = _ours(tmp_path / "out")  # And our loader reads the sharded directory.
  np.testing.assert_array_equal(again, ours)


def test_packed_row_equals_separate_documents(tmp_path):
  make_hf_model(tmp_path, "llama", rope_parameters=LLAMA3_ROPE)
  params, cfg = hf_io.load_hf(tmp_path)
  model = Transformer(cfg)
  a, b = TOKENS[0, :10], TOKENS[1, :14]
  packed = np.concatenate([a, b])[None]
  segments = np.array([[1] * 10 + [2] * 14])
  positions = np.array([list(range(10)) + list(range(14))])
  out = model.apply({"params": params}, packed, positions, segments)
  alone_a = model.apply({"params": params}, a[None])
  alone_b = model.apply({"params": params}, b[None])
  np.testing.assert_allclose(out[0, :10], alone_a[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 10:], alone_b[0], atol=1e-5)


def test_refuses_unsupported_configs(tmp_path):
  make_hf_model(tmp_path, "mistral", sliding_window=32)
  with pytest.raises(UnsupportedModelError, match="sliding_window=32"):
    hf_io.load_hf(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  for change, needle in [({"sliding_window": None, "model_type": "gpt2"}, "model_type 'gpt2'"),
                         ({"sliding_window": None, "hidden_act": "gelu"}, "hidden_act 'gelu'"),
                         ({"sliding_window": None, "rope_parameters": {"rope_type": "yarn"}}, "'yarn'")]:
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UnsupportedModelError, match=needle):
      hf_io.load_hf(tmp_path)


def test_refuses_unknown_tensors(tmp_path):
  from proxykd.models import safetensors_io
  make_hf_model(tmp_path, "llama")
  src = safetensors_io.SafetensorsFile(tmp_path / "model.safetensors")
  tensors = [(k, src.shape(k), src.get(k).dtype, lambda k=k: src.get(k)) for k in src.keys()]
  tensors.append(("model.layers.0.self_attn.q_norm.weight", (16,), np.float32, lambda: np.ones(16, np.float32)))
  safetensors_io.write_file(tmp_path / "model2.safetensors", tensors)
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(UnsupportedModelError, match="q_norm"):
    hf_io.load_hf(tmp_path)


def test_sharded_load_places_each_tensor_on_the_mesh(tmp_path):
  """Load straight onto an 8-device (fsdp=4, tensor=2) mesh: same logits, params sharded."""
  reference = make_hf_model(tmp_path, "llama", rope_parameters=LLAMA3_ROPE)
  np.save(tmp_path / "tokens.npy", TOKENS)
  out = run_python(f"""
      import jax, numpy as np
      from proxykd.models import Transformer, hf_io, logical_axes, read_hf_config
      from proxykd.train.sharding import make_mesh, logical_to_sharding
      mesh = make_mesh({{"data": 1, "fsdp": 4, "tensor": 2}})
      cfg = read_hf_config("{tmp_path}")
      shardings = logical_to_sharding(logical_axes(cfg), mesh)
      params, cfg = hf_io.load_hf("{tmp_path}", shardings=shardings)
      q = params["layers"]["attn"]["q"]["kernel"]
      assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None), q.sharding
      assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 16, 2, 16)
      logits = Transformer(cfg).apply({{"params": params}}, np.load("{tmp_path}/tokens.npy"))
      np.save("{tmp_path}/sharded.npy", np.asarray(logits))
      print("ok")
  """, devices=8)
  assert "ok" in out
  np.testing.assert_array_less(np.abs(np.load(tmp_path / "sharded.npy") - hf_logits(reference, TOKENS)).max(), 1e-4)


def test_load_with_fresh_lora_adapters_keeps_the_model(tmp_path):
  reference = make_hf_model(tmp_path, "llama")
  ours, params, cfg = _ours(tmp_path, lora_rank=4)
  assert cfg.lora_rank == 4 and params["layers"]["mlp"]["down"]["lora_a"].shape == (2, 112, 4)
  np.testing.assert_array_less(np.abs(ours - hf_logits(reference, TOKENS)).max(), 1e-4)


def test_long_sequence_block_causal_attention_matches(tmp_path):
  """At T >= 256 attention runs in causal query blocks; it must still equal the reference,
  packed segments included."""
  from proxykd.models.transformer import _causal_blocks
  assert _causal_blocks(384) == 3 and _causal_blocks(24) == 1
  reference = make_hf_model(tmp_path, "llama", max_position_embeddings=512)
  tokens = np.random.RandomState(1).randint(0, 128, size=(1, 384))
  ours, params, cfg = _ours(tmp_path, tokens)
  np.testing.assert_array_less(np.abs(ours - hf_logits(reference, tokens)).max(), 1e-4)
  cut = 200  # Two packed documents whose boundary falls inside a query block.
  segments = np.array([[1] * cut + [2] * (384 - cut)])
  positions = np.array([list(range(cut)) + list(range(384 - cut))])
  packed = Transformer(cfg).apply({"params": params}, tokens, positions, segments)
  np.testing.assert_array_less(np.abs(packed[0, cut:] - hf_logits(reference, tokens[:, cut:])[0]).max(), 1e-4)
