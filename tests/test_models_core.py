"""Presets, configs, the KV-cache sampler, LoRA and tokenizers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxykd.models import ModelConfig, Transformer, init_params, preset
from proxykd.models.sampling import generate
from proxykd.models.tokenizer import build_demo_tokenizer, check_same_tokenizer, load_tokenizer
from proxykd.models import lora


@pytest.mark.parametrize("name,expected", [
    ("llama2_7b", 6_738_415_616), ("llama2_13b", 13_015_864_320), ("llama2_70b", 68_976_648_192),
    ("llama3_8b", 8_030_261_248), ("llama3_70b", 70_553_706_496), ("qwen2_5_7b", 7_615_616_512)])
def test_presets_have_the_published_parameter_counts(name, expected):
  assert preset(name).num_params == expected


def test_small_preset_is_about_25m():
  assert 20e6 < preset("small").num_params < 30e6


def test_config_round_trip_and_errors():
  cfg = preset("llama3_8b")
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg
  from configs.common import model_config  # The CLI-overridable `config.model` block.
  block = model_config("llama3_8b")
  block.lora_targets = "q,v"
  assert ModelConfig.from_config_block(block) == cfg.replace(lora_targets=("q", "v"))
  with pytest.raises(KeyError, match="no_such_field"):
    ModelConfig.from_dict({**cfg.to_dict(), "no_such_field": 1})
  with pytest.raises(ValueError, match="num_kv_heads"):
    preset("tiny", num_kv_heads=3)


def test_kv_cache_sampling_matches_full_recompute():
  cfg = preset("tiny")
  params = init_params(cfg, jax.random.PRNGKey(1))
  prompts = [[5, 6, 7, 8, 9], [10, 11], [3] * 20]
  gens = generate(params, cfg, prompts, max_new_tokens=6, top_logprobs=2)
  forward = jax.jit(lambda t: Transformer(cfg).apply({"params": params}, t))
  for prompt, gen in zip(prompts, gens):
    seq = list(prompt)
    for i in range(6):  # Right-padded to one length: causal, so padding cannot change the logits.
      logits = forward(jnp.asarray([seq + [0] * (32 - len(seq))]))[0, len(seq) - 1]
      logp = jax.nn.log_softmax(logits)
      assert gen.tokens[i] == int(jnp.argmax(logp))
      assert abs(gen.logprobs[i] - float(logp[gen.tokens[i]])) < 1e-4
      assert gen.top_logprobs[i][0][0] == gen.tokens[i]
      seq.append(gen.tokens[i])
    assert gen.finish_reason == "length"


def test_sampling_stops_at_eos_and_is_seeded():
  cfg = preset("tiny")
  params = init_params(cfg, jax.random.PRNGKey(2))
  first = generate(params, cfg, [[1, 2, 3]], max_new_tokens=8)[0]
  eos = first.tokens[2]
  stopped = generate(params, cfg, [[1, 2, 3]], max_new_tokens=8, eos_ids=[eos])[0]
  assert stopped.tokens == first.tokens[:first.tokens.index(eos) + 1]
  assert stopped.finish_reason == "stop"
  a = generate(params, cfg, [[1, 2, 3]] * 2, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
  b = generate(params, cfg, [[1, 2, 3]] * 2, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
  assert [g.tokens for g in a] == [g.tokens for g in b]


def test_lora_starts_as_identity_and_merges_exactly():
  base = preset("tiny")
  cfg = base.replace(lora_rank=4)
  params = init_params(cfg, jax.random.PRNGKey(0))
  tokens = jnp.arange(12)[None]
  apply = jax.jit(lambda c, p: Transformer(c).apply({"params": p}, tokens), static_argnums=0)
  merged0, _ = lora.merge(params, cfg)  # B = 0: the adapters change nothing yet.
  np.testing.assert_allclose(apply(cfg, params), apply(base, merged0), atol=1e-6)
  bumped = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.05 if lora.is_lora(p) else x, params)
  merged, merged_cfg = lora.merge(bumped, cfg)
  assert merged_cfg.lora_rank == 0
  np.testing.assert_allclose(apply(cfg, bumped), apply(merged_cfg, merged), atol=1e-5)
  mask = lora.trainable_mask(params, cfg)
  assert mask["layers"]["attn"]["q"]["lora_a"] and not mask["layers"]["attn"]["q"]["kernel"]


def test_demo_tokenizer_chat_template(demo_tokenizer_dir):
  tok = load_tokenizer(demo_tokenizer_dir)
  text = "Tom has 3 apples. 3 + 4 = 7\n#### 7"
  assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
  messages = [{"role": "user", "content": "What is 3 + 4?"}]
  prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  assert prompt.startswith("<|begin_of_text|><|start_header_id|>user")
  assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
  assert tok.eos_token == "<|eot_id|>" and tok.pad_token_id is not None
  check_same_tokenizer(tok, load_tokenizer(demo_tokenizer_dir))


def test_different_tokenizers_are_refused(demo_tokenizer_dir, tmp_path):
  other = build_demo_tokenizer(tmp_path, ["completely different text here"] * 10, vocab_size=300)
  with pytest.raises(ValueError, match="tokenizers differ"):
    check_same_tokenizer(load_tokenizer(demo_tokenizer_dir), other)


def test_remat_and_bfloat16_compute():
  """Rematerialisation changes nothing numerically; bf16 compute stays close to float32."""
  cfg = preset("tiny")
  params = init_params(cfg, jax.random.PRNGKey(3))
  tokens = jnp.arange(16)[None] % cfg.vocab_size

  def loss(c, p):
    return jnp.mean(Transformer(c).apply({"params": p}, tokens) ** 2)

  grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
  base_loss, base_grad = grad(cfg, params)
  remat_loss, remat_grad = grad(cfg.replace(remat="full"), params)
  np.testing.assert_allclose(remat_loss, base_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), remat_grad, base_grad)
  bf16 = jax.jit(lambda p: Transformer(cfg.replace(dtype="bfloat16")).apply({"params": p}, tokens))(params)
  f32 = jax.jit(lambda p: Transformer(cfg).apply({"params": p}, tokens))(params)
  assert bf16.dtype == jnp.float32  # Logits are always returned in float32.
  np.testing.assert_allclose(bf16, f32, atol=0.05)
