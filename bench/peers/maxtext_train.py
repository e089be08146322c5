"""Runs MaxText's pre-training trainer (maxtext.trainers.pre_train.train) unchanged, and prints
the exact parameter counts and MaxText's own FLOP count of the configured model.

Run by run_maxtext.sh in the venv that setup_maxtext.sh builds, with the trainer's own
arguments (base.yml, then key=value overrides):

  python bench/peers/maxtext_train.py <maxtext>/configs/base.yml key=value ...

MaxText logs the parameter count only as "number parameters: 0.017 billion" and the FLOPs
per step rounded to 0.01 TFLOP, too coarse to check against gemini_mini's count. So this wraps
``MetricLogger.write_setup_info_to_tensorboard`` (called once, with the real parameter tree,
before the first step): it still runs as before, and it also prints one line

  maxtext_params {json}

with the parameter counts by kind (from the tree's paths: expert weights, input embedding,
norm scales) and ``calculate_tflops_training_per_device(config)`` unrounded. Nothing in the
training step changes.
"""

import json
import sys

import jax
import numpy as np
from absl import app
from maxtext.common import metric_logger
from maxtext.trainers.pre_train import train
from maxtext.utils import maxtext_utils


def _path_name(path) -> str:
  parts = []
  for entry in path:
    for attribute in ('key', 'name', 'idx'):
      if hasattr(entry, attribute):
        parts.append(str(getattr(entry, attribute)))
        break
    else:
      parts.append(str(entry))
  return '/'.join(parts)


def parameter_counts(params, config) -> dict:
  sizes = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    sizes[_path_name(path)] = int(np.prod(np.shape(leaf)))
  total = sum(sizes.values())
  lower = {name.lower(): size for name, size in sizes.items()}
  is_expert = lambda name: 'moe' in name and any(w in name.split('/')
                                                 for w in ('wi_0', 'wi_1', 'wo'))
  expert = sum(size for name, size in lower.items() if is_expert(name))
  embed = sum(size for name, size in lower.items() if 'token_embedder' in name)
  norms = sum(size for name, size in lower.items() if 'norm' in name)
  k, e = config.num_experts_per_tok, config.num_experts
  active = total - expert + expert * k // e
  return {'params_total': total, 'params_active_per_token': active, 'params_expert': expert,
          'params_embedding': embed, 'params_norm': norms,
          'matmul_params_per_token': active - embed - norms,
          'leaves': {name: size for name, size in sizes.items()}}


_original = metric_logger.MetricLogger.write_setup_info_to_tensorboard


def _write_setup_info(self, params):
  _original(self, params)
  config = self.config
  counts = parameter_counts(params, config)
  total_tflops, weight_tflops, attention_tflops = (
      maxtext_utils.calculate_tflops_training_per_device(config, log=False))
  tokens = config.per_device_batch_size * config.max_target_length
  counts.update({
      'maxtext_train_flops_per_token': total_tflops * 1e12 / tokens,
      'maxtext_weight_flops_per_token': weight_tflops * 1e12 / tokens,
      'maxtext_attention_flops_per_token': attention_tflops * 1e12 / tokens,
      'dtype': str(config.dtype), 'weight_dtype': str(config.weight_dtype),
      'sparse_matmul': bool(config.sparse_matmul), 'capacity_factor': float(config.capacity_factor),
      'load_balance_loss_weight': float(config.load_balance_loss_weight),
      'remat_policy': str(config.remat_policy), 'scan_layers': bool(config.scan_layers),
  })
  print('maxtext_params ' + json.dumps(counts), flush=True)


metric_logger.MetricLogger.write_setup_info_to_tensorboard = _write_setup_info


if __name__ == '__main__':
  sys.argv[0] = train.__file__  # absl flags parse argv[1:] as the trainer's own
  app.run(train.main)
