"""What a multi-host run needs of every layer: arrays gathered to this host, one writer, barriers.

Every host runs the same program; arrays sharded over devices of other hosts must be gathered
before the host reads them (`to_host`), files every host would write alike are written by the main
host only (`is_main`), and readers wait for the writer (`barrier`). On one host these are a
device_get, True and a no-op.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def to_host(x) -> np.ndarray:
  """The whole of `x` on this host, whichever devices (of whichever hosts) hold its shards."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def is_main() -> bool:
  """The host that writes files every host would write alike."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every host waits here until all have arrived (e.g. until the main host has written)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
