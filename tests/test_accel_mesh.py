"""The mesh comes from jax.make_mesh (topology-aware) unless the caller lists the devices."""
import json

from jax.sharding import AxisType

from conftest import run_python

SCRIPT = r"""
import json
import jax
from jax.sharding import AxisType
from proxykd.train import sharding as shd
ids = lambda mesh: [d.id for d in mesh.devices.flat]
default = shd.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
reference = jax.make_mesh((2, 2, 2), shd.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
permuted = list(reversed(jax.devices()))
explicit = shd.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}, permuted)
print("RESULT" + json.dumps({
    "default": ids(default), "reference": ids(reference), "shape": dict(default.shape),
    "types": [str(t) for t in default.axis_types + explicit.axis_types],
    "explicit": ids(explicit), "permuted": [d.id for d in permuted]}))
"""


def test_default_mesh_is_jax_make_mesh_and_explicit_devices_keep_their_order():
  out = json.loads(run_python(SCRIPT, devices=8).split("RESULT", 1)[1])
  assert out["default"] == out["reference"]
  assert out["shape"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert set(out["types"]) == {str(AxisType.Auto)}
  assert out["explicit"] == out["permuted"]
