"""Run in a fresh process with 8 fake CPU devices (see test_checkpoint.py): save a train state
sharded on one mesh, restore it onto another, and print what came back as JSON."""

import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gemini_mini import config as config_lib, parallel  # noqa: E402
from gemini_mini.config import MeshConfig  # noqa: E402
from gemini_mini.train.checkpoint import Checkpointer  # noqa: E402
from gemini_mini.train.optimizer import make_optimizer  # noqa: E402
from gemini_mini.train.step import abstract_train_state, init_train_state  # noqa: E402


def main(directory: str):
  config = config_lib.load('configs/test.yaml', ['model.moe_every=1'])
  optimizer = make_optimizer(learning_rate=1e-3, steps=10, warmup_steps=1, weight_decay=0.1,
                             grad_clip=1.0)
  save_mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=4))
  _, shardings, _ = abstract_train_state(config.model, optimizer, save_mesh, seed=3)
  saved = init_train_state(config.model, optimizer, shardings, seed=3)
  checkpointer = Checkpointer(directory, keep=1, config=config.to_dict())
  checkpointer.save(1, saved, {'position': 1})
  checkpointer.close()

  restore_mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
  _, restore_shardings, abstract = abstract_train_state(config.model, optimizer, restore_mesh,
                                                        seed=3)
  _, restored, _ = Checkpointer(directory, keep=1, config=config.to_dict()).restore(abstract)
  equal = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                       saved, restored)
  placed = jax.tree.map(lambda x, s: x.sharding == s, restored, restore_shardings)
  print(json.dumps({
      'all_equal': all(jax.tree.leaves(equal)),
      'all_placed_as_asked': all(jax.tree.leaves(placed)),
      'differently_sharded_leaves': sum(
          a.sharding.spec != b.sharding.spec
          for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored))),
  }))


if __name__ == '__main__':
  main(sys.argv[1])
