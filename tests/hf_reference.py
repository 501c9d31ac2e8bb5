"""Tiny random HF models written with transformers + torch (the reference implementation)."""
import numpy as np


def make_hf_model(out_dir, family="llama", seed=0, dtype="float32", **overrides):
  """Save a tiny random `<family>ForCausalLM` to out_dir; return the torch model (float32, eval)."""
  import torch
  import transformers

  torch.manual_seed(seed)
  common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=112, vocab_size=128, max_position_embeddings=256)
  common.update(overrides)
  if family == "llama":
    config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
  elif family == "qwen2":
    config, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
  elif family == "mistral":
    config, cls = transformers.MistralConfig(**common), transformers.MistralForCausalLM
  else:
    raise ValueError(family)
  model = cls(config).eval()
  with torch.no_grad():  # Non-trivial norms and biases, so a mistake in any of them shows.
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  model.to(getattr(torch, dtype)).save_pretrained(out_dir)
  return model.float()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens))).logits.float().numpy()
