"""The loop stops on a non-finite loss with a clear message, keeping the last good checkpoint."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxykd.data.batches import BatchIterator, HostSlice
from proxykd.data.packing import empty_rows
from proxykd.train import loop, manager, metrics, sharding as shd
from proxykd.train.state import TrainState


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  state = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.ones((4,))},
                     opt_state={"m": jnp.zeros((4,))}, rng=jax.random.PRNGKey(0))

  def step_fn(state, batch, frozen):
    del frozen  # Diverges at step 7 (1-based): w becomes NaN, as the loss does.
    w = jnp.where(state.step == 6, jnp.nan, state.params["w"] + 1.0)
    loss = jnp.sum(w) + 0.0 * jnp.sum(batch["inputs"])
    m = {"loss": loss, "grad_norm": loss, "lr": 1.0, "tokens": 1.0, "batch_tokens": 1.0}
    return state.replace(step=state.step + 1, params={"w": w}), m

  ckpt = manager.TrainCheckpoints(tmp_path / "checkpoints")
  writer = metrics.MetricWriter(tmp_path, 20, console=False)
  data = BatchIterator(empty_rows(8, 4), 2, seed=0)
  host = HostSlice(shd.batch_sharding(mesh), 2)
  with pytest.raises(loop.NonFiniteLossError,
                     match=r"loss is nan at step 7 .*last good checkpoint is step 6 in .*checkpoints"):
    loop.train(state, step_fn, data, host, {}, ckpt, {"model": {}}, writer,
               loop.LoopConfig(total_steps=20, log_every=4, save_every=3))
  writer.close()
  again = manager.TrainCheckpoints(tmp_path / "checkpoints")
  assert again.latest_step() == 6
  restored, _, data_state = again.restore(6, state)
  np.testing.assert_array_equal(restored.params["w"], np.full(4, 7.0))
  assert data_state["position"] == 12
