"""Run in a fresh process with 8 fake CPU devices (see test_post_training_stages.py): one step
of the reward stage, as ``loop.run`` takes it, on several meshes, printed as JSON for
comparison with one device.

    python sharded_preference.py DATA_DIR REWARD_RUN_DIR
"""

import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gemini_mini import config as config_lib, parallel  # noqa: E402
from gemini_mini.train import loop  # noqa: E402

# Parameters split along embed (fsdp), experts and heads (tensor); rows over fsdp and expert.
MESHES = {'single': dict(data=1),
          'fsdp2_expert2_tensor2': dict(data=1, fsdp=2, expert=2, tensor=2)}


def main(data_dir: str, init_from: str):
  # Started from a trained reward model: a zero head would give the decoder no gradient.
  config = config_lib.load('configs/test.yaml', [
      f'data.dir={data_dir}', 'train.seq_len=512', 'data.num_audio_frames=192',
      'train.stage=reward', 'model.scalar_head=true', f'train.init_from={init_from}',
      'train.batch_size=4', 'train.warmup_steps=0', 'train.weight_decay=0',
      'train.run_dir=unused'])
  results = {}
  for name, sizes in MESHES.items():
    devices = jax.devices()[:1] if name == 'single' else jax.devices()
    mesh = parallel.make_mesh(config_lib.MeshConfig(**sizes), devices)
    stage = loop.make_stage(config, mesh)
    state = stage.init_state()
    first_64 = lambda params: {jax.tree_util.keystr(path): np.asarray(p).ravel()[:64].tolist()
                               for path, p in jax.tree_util.tree_leaves_with_path(params)}
    start = first_64(state.params)
    sharded_leaves = sum(not leaf.sharding.is_fully_replicated
                         for leaf in jax.tree.leaves(state.params))
    stage.open_data(None)
    state, metrics = stage.train(state, 1)
    results[name] = {
        'sharded_leaves': int(sharded_leaves),
        **{key: float(metrics[key]) for key in ('loss', 'preference_loss', 'grad_norm',
                                                 'reward_chosen', 'reward_rejected')},
        'start': start, 'params': first_64(state.params),
    }
    stage.close()
  print(json.dumps(results))


if __name__ == '__main__':
  main(*sys.argv[1:])
