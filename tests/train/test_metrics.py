"""MFU's FLOP count, written-out formula checks, the metrics files on resume, reading them back."""

import json
import math

import numpy as np
import pytest

from gemini_mini import config as config_lib
from gemini_mini.train.metrics import (MetricsWriter, device_peak_flops, read_metrics, scalars,
                                       train_flops_per_token)


def test_flops_per_token_of_the_peer_shape():
  # shared/peers/README.md: the shared shape (nano) costs about 41.7 MFLOP per trained token:
  # 6 * 5,906,432 matmul parameters + 12 * 4 layers * 4 heads * 64 * 512 tokens.
  nano = config_lib.load('configs/nano.yaml').model
  assert train_flops_per_token(nano, 512) == 6 * 5_906_432 + 12 * 4 * 4 * 64 * 512 == 41_730_048


def test_dense_layers_count_one_ffn():
  m = config_lib.load(None, ['model.num_experts=0']).model
  attention = m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
  per_layer = attention + 3 * m.d_model * m.d_ff
  expected = 6 * (m.num_layers * per_layer + m.d_model * m.vocab_size)
  assert train_flops_per_token(m, 1) == expected + 12 * m.num_layers * m.num_heads * m.head_dim


class FakeDevice:
  def __init__(self, platform, device_kind):
    self.platform, self.device_kind = platform, device_kind


@pytest.mark.parametrize('platform, kind, peak', [
    ('cpu', 'cpu', 1.9e11),
    ('gpu', 'NVIDIA H100 80GB HBM3', 989e12),
    ('gpu', 'NVIDIA H100 PCIe', 756e12),  # before the H100 family's entry
    ('gpu', 'NVIDIA H200', 989e12),
    ('gpu', 'NVIDIA A100-SXM4-80GB', 312e12),
    ('tpu', 'TPU v5 lite', 197e12),  # v5e, before v5p's 'TPU v5'
    ('tpu', 'TPU v5', 459e12),
    ('gpu', 'NVIDIA GeForce RTX 4090', None),  # not in the table: no MFU rather than a wrong one
])
def test_device_peak_flops(platform, kind, peak):
  assert device_peak_flops(FakeDevice(platform, kind)) == peak


def test_peak_flops_per_device_is_optional_and_positive():
  assert config_lib.load(None).train.peak_flops_per_device is None
  assert config_lib.load(None, ['train.peak_flops_per_device=989e12']).train.peak_flops_per_device == 989e12
  with pytest.raises(config_lib.ConfigError, match='train.peak_flops_per_device'):
    config_lib.load(None, ['train.peak_flops_per_device=0'])


def test_scalars_flatten_router_statistics():
  flat = scalars({'loss': 2.0, 'expert_load_LE': [[0.5, 0.5]], 'dropped_L': [0.25]})
  assert flat == {'loss': 2.0, 'expert_load/layer0/expert0': 0.5,
                  'expert_load/layer0/expert1': 0.5, 'dropped/layer0': 0.25}


def test_a_resumed_run_drops_what_was_logged_after_its_checkpoint(tmp_path):
  writer = MetricsWriter(tmp_path)
  for step in (1, 2, 3, 4):
    writer.write(step, {'loss': float(step), 'mfu': float('nan')})
  writer.close()
  writer = MetricsWriter(tmp_path, resume_step=2)
  writer.write(3, {'loss': 30.0})
  writer.close()
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['loss']) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0)]
  assert records[0]['mfu'] is None  # non-finite values are null, not NaN (invalid JSON)


def test_read_metrics_gives_one_column_per_scalar_with_nan_where_missing(tmp_path):
  writer = MetricsWriter(tmp_path)
  writer.write(10, {'loss': 3.0, 'mfu': float('nan')})
  writer.write(20, {'loss': 2.5, 'mfu': 0.25, 'eval/loss': 2.75})
  writer.close()
  columns = read_metrics(tmp_path)
  assert list(columns) == ['step', 'loss', 'mfu', 'eval/loss']
  assert columns['step'].dtype == np.int64 and columns['step'].tolist() == [10, 20]
  assert columns['loss'].tolist() == [3.0, 2.5]
  assert math.isnan(columns['mfu'][0]) and columns['mfu'][1] == 0.25  # logged as null
  assert math.isnan(columns['eval/loss'][0]) and columns['eval/loss'][1] == 2.75  # not logged


def test_read_metrics_names_the_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='metrics.jsonl'):
    read_metrics(tmp_path)
