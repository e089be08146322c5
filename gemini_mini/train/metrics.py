"""Metrics: the analytic FLOP count behind MFU, and the writers (JSON lines, TensorBoard).

MFU = achieved model FLOP/s / (peak FLOP/s per device * devices), with the model FLOPs of a
trained token counted as in the PaLM paper (appendix B):

    6 * (matmul parameters a token uses) + 12 * layers * heads * head_dim * seq_len

The first term is the forward (2 FLOPs per multiply-add) plus a backward twice as costly, over
the attention projections, the k routed experts (and shared expert) a token visits, the
router and the output head; the embedding lookup is not a matmul. The second is the
attention scores and their weighted sum, counted over the full (not causally halved) context,
as the dense kernel computes it. Image/audio encoders are left out (a small share of tokens).

The peak is ``train.peak_flops_per_device`` where set, else ``device_peak_flops``: the
datasheet's dense bfloat16 peak of known GPUs and TPUs, and on a CPU the float32 matmul rate
that ``bench/`` measured on the 2-core machine this project is developed on (another CPU
should set its own).

``read_metrics(run_dir)`` reads ``metrics.jsonl`` back as one array per scalar, for plots.
"""

import json
import math
import pathlib

import numpy as np
from tensorboardX import SummaryWriter

from gemini_mini.config import ModelConfig


def matmul_params_per_token(m: ModelConfig) -> int:
  attention = m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
  dense_ffn = 3 * m.d_model * m.d_ff
  total = m.d_model * m.vocab_size
  for layer in range(m.num_layers):
    ffn = dense_ffn
    if m.is_moe_layer(layer):
      ffn = (m.experts_per_token + m.shared_expert) * dense_ffn + m.d_model * m.num_experts
    total += attention + ffn
  return total


def train_flops_per_token(m: ModelConfig, seq_len: int) -> float:
  return 6.0 * matmul_params_per_token(m) + 12.0 * m.num_layers * m.num_heads * m.head_dim * seq_len


# Dense bfloat16 FLOP/s by the start of ``jax.Device.device_kind``; first match wins, so a
# variant comes before its family.
PEAK_FLOPS_BY_DEVICE_KIND = (
    ('NVIDIA H100 PCIe', 756e12), ('NVIDIA H100', 989e12), ('NVIDIA H200', 989e12),
    ('NVIDIA GH200', 989e12), ('NVIDIA A100', 312e12), ('NVIDIA L4', 121e12),
    ('TPU v4', 275e12), ('TPU v5 lite', 197e12), ('TPU v5', 459e12), ('TPU v6 lite', 918e12),
)
CPU_PEAK_FLOPS = 1.9e11  # XLA's float32 matmul on the 2-core development machine (bench/)


def device_peak_flops(device) -> float | None:
  """Peak FLOP/s of one ``jax.Device``, or None for an accelerator not in the table."""
  if device.platform == 'cpu':
    return CPU_PEAK_FLOPS
  for kind, peak in PEAK_FLOPS_BY_DEVICE_KIND:
    if device.device_kind.startswith(kind):
      return peak
  return None


def scalars(metrics: dict) -> dict[str, float]:
  """Flattens arrays into named scalars: ``expert_load_LE`` -> ``expert_load/layer0/expert3``."""
  flat = {}
  for name, value in metrics.items():
    value = np.asarray(value)
    if value.ndim == 0:
      flat[name] = float(value)
    elif name == 'expert_load_LE':
      for layer, row in enumerate(value):
        flat.update({f'expert_load/layer{layer}/expert{e}': float(v) for e, v in enumerate(row)})
    elif name == 'dropped_L':
      flat.update({f'dropped/layer{layer}': float(v) for layer, v in enumerate(value)})
  return flat


class MetricsWriter:
  """Appends one JSON object per logged step to ``metrics.jsonl`` and the same scalars to
  TensorBoard. Non-finite values are written as null in JSON.

  A run resumed from step ``resume_step`` first drops what an interrupted run logged after
  that step, in both files, so each step appears once and the logs read as one run.
  """

  def __init__(self, run_dir: str | pathlib.Path, resume_step: int = 0):
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / 'metrics.jsonl'
    if path.exists():
      kept = [line for line in path.read_text().splitlines()
              if line.strip() and json.loads(line)['step'] <= resume_step]
      path.write_text(''.join(line + '\n' for line in kept))
    self.jsonl = open(path, 'a')
    self.tensorboard = SummaryWriter(str(run_dir / 'tensorboard'), purge_step=resume_step + 1)

  def write(self, step: int, values: dict[str, float]) -> None:
    record = {'step': step, **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
    self.jsonl.write(json.dumps(record) + '\n')
    self.jsonl.flush()
    for name, value in values.items():
      if math.isfinite(value):
        self.tensorboard.add_scalar(name, value, step)

  def close(self) -> None:
    self.jsonl.close()
    self.tensorboard.close()


def read_metrics(run_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
  """What ``MetricsWriter`` logged in ``run_dir/metrics.jsonl``, as columns for plotting.

  Returns:
    ``{'step': [N] int64, name: [N] float64, ...}`` with N the logged steps in file order
    and a column for every scalar any step logged (``'loss'``, ``'router_z'``,
    ``'expert_load/layer0/expert3'``, ...): NaN where a step did not log it or logged a
    non-finite value (written as null).

  Raises:
    FileNotFoundError: ``run_dir`` holds no ``metrics.jsonl`` (no step was logged yet).
  """
  path = pathlib.Path(run_dir) / 'metrics.jsonl'
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no metrics; train with train.run_dir={run_dir} first '
                            '(a step is logged every train.log_every steps)')
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  names = dict.fromkeys(name for record in records for name in record if name != 'step')
  columns = {'step': np.array([record['step'] for record in records], np.int64)}
  for name in names:
    columns[name] = np.array([np.nan if record.get(name) is None else record[name]
                              for record in records], np.float64)
  return columns
