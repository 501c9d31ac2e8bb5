"""The step's seams on one device: frozen models as explicit inputs, per-token features carried
generically from examples to the compiled step, and LoRA checkpoints that hold only adapters."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import proxy_sft as proxy_sft_config
from proxykd import losses
from proxykd.data import batches, packing
from proxykd.data.tokenize import Example
from proxykd.models import checkpoint, lora
from proxykd.models.config import preset
from proxykd.models.transformer import Transformer, lm_head_kernel
from proxykd.train import optimizer, sharding as shd, state as st, step as sp, trainer

B, T = 4, 32
CFG = preset("tiny")
PROXY = preset("tiny", num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2,
               num_kv_heads=1)


def _examples(n=40, seed=0, k=4):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    m = int(rng.integers(6, 30))
    ids = ((int(rng.integers(0, 512)) + 5 * np.arange(m)) % 512).astype(np.int32)
    out.append(Example(ids, np.arange(m) >= m // 3, f"rec{i}", features={
        "weight": np.full(m, 0.5 + i % 3, np.float32),
        "topk_ids": ((ids[:, None] + np.arange(k)) % 512).astype(np.int32),
        "topk_logp": np.log(np.full((m, k), 1.0 / k, np.float32))}))
  return out


def _prior_feature(local):
  """A per-batch host feature (like the corpus prior's top-K): computed from the local rows."""
  return {"prior_ids": np.stack([local["targets"], (local["targets"] + 1) % 512], -1).astype(np.int32)}


def _loss_reading_everything():
  """NLL weighted per token by batch["weight"], plus a term from the frozen proxy's log-prob of
  each top-k id: it reads the frozen proxy, a stored feature and a per-batch feature."""
  model, proxy = Transformer(CFG), Transformer(PROXY)

  def fn(params, frozen, batch, rng):
    del rng
    hidden = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                         return_hidden=True)
    mask = batch["loss_mask"] * batch["weight"]
    nll = losses.nll(hidden, lm_head_kernel(params, CFG), batch["targets"], mask, 8,
                     normalizer=jnp.ones(()))
    proxy_logits = proxy.apply({"params": frozen["proxy"]}, batch["inputs"], batch["positions"],
                               batch["segment_ids"])
    picked = jnp.take_along_axis(jax.nn.log_softmax(proxy_logits), batch["topk_ids"], -1)
    prior = jnp.take_along_axis(jax.nn.log_softmax(proxy_logits), batch["prior_ids"], -1)
    extra = -jnp.sum((picked.mean(-1) + prior.mean(-1)) * batch["loss_mask"])
    return nll + extra, {"test/extra": (extra, sp.token_count(batch))}

  return sp.Loss(fn, sp.token_count)


def test_features_are_packed_generically_and_the_step_is_compiled_from_the_element_spec():
  examples = _examples()
  rows = packing.pack(examples, T)
  spec = rows.element_spec()
  assert spec["topk_ids"] == ((T, 4), np.dtype(np.int32))
  assert spec["weight"] == ((T,), np.dtype(np.float32))
  r, seg = 0, 1  # The first document of the first row: its features sit at its target slots.
  cols = np.flatnonzero(rows.arrays["segment_ids"][r] == seg)
  ex = examples[0]
  np.testing.assert_array_equal(rows.arrays["topk_ids"][r, cols], ex.features["topk_ids"][1:])
  np.testing.assert_array_equal(rows.arrays["weight"][r, cols], ex.features["weight"][1:])
  pad = rows.arrays["segment_ids"] == 0
  assert (rows.arrays["weight"][pad] == 0).all() and (rows.arrays["topk_ids"][pad] == 0).all()

  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  element = batches.local_spec(rows.arrays, B, [_prior_feature])
  assert set(element) == set(packing.ROW_KEYS) | {"weight", "topk_ids", "topk_logp", "prior_ids"}
  assert element["prior_ids"] == ((T, 2), np.dtype(np.int32))
  tx, sched = optimizer.make_optimizer(optimizer.default_config(), 10)
  frozen_spec = {"proxy": st.model_spec(PROXY, mesh)}
  compiled = sp.compile_step(sp.make_train_step(_loss_reading_everything(), tx, sched),
                             st.abstract_state(CFG, tx), st.state_shardings(CFG, tx, mesh),
                             sp.batch_spec(element, B, mesh), frozen_spec, mesh)
  data = batches.BatchIterator(rows.arrays, B, seed=0, features=[_prior_feature])
  batch = data.next_local()
  host = batches.HostSlice(shd.batch_sharding(mesh), B)

  def run(proxy_seed, batch):
    params = checkpoint.load_params({"random": 0}, CFG)
    state, _ = st.init_state(CFG, tx, mesh, 0, params)
    frozen = {"proxy": checkpoint.load_params({"random": proxy_seed}, PROXY)}
    _, m = compiled(state, host.assemble(batch), frozen)
    assert not any(x.is_deleted() for x in jax.tree.leaves(frozen))  # Never donated.
    return jax.device_get(m)

  a, b = run(1, batch), run(2, batch)  # The same compiled step, another proxy: another loss.
  assert a["test/extra"] != b["test/extra"] and a["loss"] != b["loss"]
  heavier = dict(batch, weight=batch["weight"] * 2)
  assert run(1, heavier)["loss"] != a["loss"]  # The stored feature reaches the loss.


def _config(tmp_path, lora_rank):
  config = proxy_sft_config.get_config("runlocal")
  config.model = ml_collections.ConfigDict({**config.model.to_dict(), "lora_rank": lora_rank})
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.train.update(steps=4, batch_size=B, save_every=2, log_every=1, eval_every=0,
                      progress_bar=False, async_save=False)
  config.data.update(seq_len=T)
  return config


def test_lora_checkpoint_stores_adapters_and_a_pointer_to_its_base(tmp_path):
  config = _config(tmp_path, lora_rank=2)
  cfg = trainer.model_config(config)
  rows = packing.pack(_examples(), T)
  mesh = trainer.make_mesh(config, {"model": cfg})
  result = trainer.fit(config, tmp_path, cfg, mesh, sp.sft_loss(cfg, 8), rows, None, {"stage": "t"},
                       trainer.weights_ref(config))
  meta = checkpoint.restore_meta(tmp_path / "checkpoints")
  assert meta["base"] == {"random": 0}
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  _, step = checkpoint.resolve(tmp_path / "checkpoints")
  saved = ocp.StandardCheckpointer().metadata(tmp_path / "checkpoints" / str(step) / "params")
  saved = getattr(saved, "item_metadata", saved)
  saved_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(saved)]
  assert saved_paths and all("lora_" in p for p in saved_paths), saved_paths  # No base weights.
  restored, _ = checkpoint.restore_params(tmp_path / "checkpoints")
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(result.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  merged, merged_cfg, _ = checkpoint.restore_for_inference(tmp_path / "checkpoints")
  assert merged_cfg.lora_rank == 0
  tokens = rows.arrays["inputs"][:2]
  np.testing.assert_allclose(Transformer(merged_cfg).apply({"params": merged}, tokens),
                             Transformer(cfg).apply({"params": result.params}, tokens), atol=1e-4)


def test_validate_mesh_checks_every_model():
  mesh = jax.sharding.AbstractMesh((1, 1, 2), shd.MESH_AXES)
  shd.validate_mesh(mesh, {"model": CFG}, 4)
  with pytest.raises(ValueError, match=r"config.proxy.num_kv_heads=1 is not a multiple"):
    shd.validate_mesh(mesh, {"model": CFG, "proxy": PROXY}, 4)
