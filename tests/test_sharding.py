"""Mesh construction and validation from the config, and the derived shardings (one device)."""
import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from proxykd.models.config import preset
from proxykd.train import optimizer, sharding, state

TINY = preset("tiny")  # 4 heads, 2 kv heads, intermediate 176


def _mesh(data=1, fsdp=1, tensor=1):
  return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES)


def test_batch_must_divide_data_times_fsdp():
  sharding.validate_mesh(_mesh(2, 4), TINY, global_batch=16)
  with pytest.raises(ValueError, match=r"micro-batch of 12 rows.*data x fsdp = 8.*data=2, fsdp=4"):
    sharding.validate_mesh(_mesh(2, 4), TINY, global_batch=12)
  with pytest.raises(ValueError, match=r"micro-batch of 4 rows.*grad_accum=4"):
    sharding.validate_mesh(_mesh(2, 4), TINY, global_batch=16, grad_accum=4)
  with pytest.raises(ValueError, match="not a multiple of config.train.grad_accum=3"):
    sharding.validate_mesh(_mesh(), TINY, global_batch=16, grad_accum=3)


def test_heads_must_divide_tensor():
  sharding.validate_mesh(_mesh(tensor=2), TINY, global_batch=4)
  with pytest.raises(ValueError, match=r"num_kv_heads=2 is not a multiple of the mesh's tensor"):
    sharding.validate_mesh(_mesh(tensor=4), TINY, global_batch=4)
  with pytest.raises(ValueError, match=r"num_heads=4 is not a multiple"):
    sharding.validate_mesh(_mesh(tensor=8), TINY, global_batch=4)


def test_mesh_from_config_errors_name_the_key():
  mesh = sharding.mesh_from_config({"data": 1, "fsdp": -1, "tensor": 1})
  assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
  with pytest.raises(ValueError, match=r"config.mesh: .*needs 2 devices"):
    sharding.mesh_from_config({"data": 2, "fsdp": 1, "tensor": 1})
  with pytest.raises(ValueError, match=r"config.mesh: .*unknown axis name"):
    sharding.mesh_from_config({"model": 1})


def test_optimizer_state_is_sharded_like_the_params():
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  tx, _ = optimizer.make_optimizer(optimizer.default_config(), 10)
  sh = state.state_shardings(TINY, tx, mesh)
  abstract = state.abstract_state(TINY, tx)
  adam = abstract.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
  adam_sh = sh.opt_state[1][0]
  assert adam_sh.mu["layers"]["mlp"]["up"]["kernel"].spec == P(None, "fsdp", "tensor")
  assert adam_sh.nu["embedding"].spec == sh.params["embedding"].spec == P("tensor", "fsdp")
  assert adam_sh.count.spec == P()
  assert jax.tree.structure(adam.mu) == jax.tree.structure(abstract.params)
