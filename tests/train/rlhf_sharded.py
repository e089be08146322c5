"""Run in a fresh process with 8 fake CPU devices (see test_rlhf.py): one PPO step (rollouts,
scoring, updates) on one device and on a data x fsdp mesh, printed as JSON."""

import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gemini_mini import config as config_lib, parallel  # noqa: E402
from gemini_mini.train.rlhf import RLHFStage  # noqa: E402

MESHES = {'single': dict(data=1), 'data2_fsdp2': dict(data=2, fsdp=2)}


def main(data_dir: str, sft_run: str, reward_run: str, out: str):
  results = {}
  for name, sizes in MESHES.items():
    config = config_lib.load('configs/test.yaml', [
        f'data.dir={data_dir}', f'train.run_dir={out}/{name}', 'train.stage=rlhf',
        f'train.init_from={sft_run}', f'post.reward_from={reward_run}',
        'model.scalar_head=true', 'train.seq_len=512', 'data.num_audio_frames=192',
        'train.batch_size=4', 'post.max_new_tokens=6', 'train.learning_rate=1e-2',
        *(f'mesh.{axis}={size}' for axis, size in sizes.items())])
    devices = jax.devices()[:int(np.prod(list(sizes.values())))]
    mesh = parallel.make_mesh(config.mesh, devices)
    stage = RLHFStage(config, mesh)
    state = stage.init_state()
    stage.open_data(None)
    state, metrics = stage.train(state, 1)
    leaves = jax.tree.leaves(state.params)
    results[name] = {
        'sharded_leaves': sum(not leaf.sharding.is_fully_replicated for leaf in leaves),
        'params': np.concatenate([np.asarray(leaf).ravel()[:32] for leaf in leaves]).tolist(),
        **{key: float(np.asarray(metrics[key])) for key in (
            'reward', 'kl', 'loss', 'policy_loss', 'value_loss', 'grad_norm',
            'response_length')}}
  print(json.dumps(results))


if __name__ == '__main__':
  main(*sys.argv[1:])
