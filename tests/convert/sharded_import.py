"""Run by test_mixtral_convert.py in a process of its own with 8 fake CPU devices: imports
the tiny fixture on a mesh of 4 expert shards x 2 data replicas and prints, as JSON, which
experts each read fetched and how each device's shard compares with one device's import."""

import os
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

import json  # pylint: disable=wrong-import-position
import sys  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position

from gemini_mini import config as config_lib, parallel  # pylint: disable=wrong-import-position
from gemini_mini.convert import from_hf, mixtral  # pylint: disable=wrong-import-position
from gemini_mini.convert.hf_files import HFCheckpoint  # pylint: disable=wrong-import-position


def main(source: str) -> None:
  hf = HFCheckpoint(source)
  model = config_lib.from_dict({'model': mixtral.model_fields(hf.config)}).model
  reads = []

  class Counting(mixtral.HubView):
    def tensor(self, name):
      reads.append(name)
      return super().tensor(name)

  results = {}
  for name, mesh_config in (('one', config_lib.MeshConfig(data=1)),
                            ('sharded', config_lib.MeshConfig(data=2, expert=4))):
    devices = jax.devices()[:1] if name == 'one' else jax.devices()
    mesh = parallel.make_mesh(mesh_config, devices)
    reads.clear()
    params = from_hf._params(Counting(hf), model, mesh)  # pylint: disable=protected-access
    flat = {'.'.join(map(str, p)): v[...] for p, v in nnx.to_flat_state(params)}
    gate = flat['blocks.0.ffn.gate_EDF']
    results[name] = {
        'gate_shards': [[int(s.index[0].start or 0), int(s.index[0].stop or 4)]
                        for s in gate.addressable_shards],
        'expert_reads': sum('experts.' in r for r in reads),
        'params': {k: np.asarray(v).ravel().tolist() for k, v in flat.items()},
        'shards_match': all(np.array_equal(np.asarray(s.data), np.asarray(gate)[s.index])
                            for s in gate.addressable_shards)}
  print(json.dumps(results))


if __name__ == '__main__':
  main(sys.argv[1])
