"""Peak memory of ``python -m gemini_mini.convert from-hf`` against the checkpoint's size.

    python bench/convert_memory.py [--out /tmp/convert_memory] [--vocab 32000 --d-model 512 ...]

Writes a random Mixtral-format checkpoint (float32, hub layout, 100 MiB shards with an index:
its file size is the model's size in memory), then converts it in a child process that
reports its resident memory before the conversion (Python, JAX and the imports) and its peak
(``ru_maxrss``). The conversion streams tensors one at a time, so the goal is
``peak - before < model bytes + largest tensor``; printed as ratios.
"""

import argparse
import json
import pathlib
import resource
import shutil
import subprocess
import sys

import numpy as np

CHILD = '''
import resource, sys
from gemini_mini.convert import from_hf
def rss():
  return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
before = rss()
from_hf.convert(sys.argv[1], sys.argv[2])
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
'''


def make_checkpoint(directory: pathlib.Path, args) -> tuple[int, int]:
  """Writes the checkpoint; returns ``(total bytes, largest tensor bytes)``."""
  from gemini_mini.config import ModelConfig
  from gemini_mini.convert import hf_files, mixtral
  model = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
                      num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                      d_ff=args.d_ff, num_experts=args.experts, experts_per_token=2,
                      tie_embeddings=False, activation='silu', renormalize_top_k='always',
                      norm_eps=1e-5, max_length=4096)
  rng = np.random.default_rng(0)
  sizes = []

  def pairs():
    for tensor in mixtral.tensors(model):
      for name, shape in zip(tensor.names, tensor.shapes):
        array = (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float32)
        sizes.append(array.nbytes)
        yield name, array
  hf_files.write(directory, mixtral.hf_config(model), pairs(), shard_bytes=100 << 20)
  return sum(sizes), max(sizes)


def main():
  parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  parser.add_argument('--out', default='/tmp/convert_memory')
  for name, default in (('vocab', 32000), ('d-model', 512), ('layers', 4), ('heads', 8),
                        ('kv-heads', 2), ('head-dim', 64), ('d-ff', 1536), ('experts', 8)):
    parser.add_argument(f'--{name}', type=int, default=default)
  args = parser.parse_args()
  root = pathlib.Path(args.out)
  shutil.rmtree(root, ignore_errors=True)
  total, largest = make_checkpoint(root / 'hf', args)
  child = subprocess.run([sys.executable, '-c', CHILD, str(root / 'hf'), str(root / 'run')],
                         capture_output=True, text=True, check=True)
  before, peak = map(int, child.stdout.split()[-2:])
  files = sum(p.stat().st_size for p in (root / 'hf').glob('*.safetensors'))
  result = {'checkpoint_bytes': files, 'model_bytes': total, 'largest_tensor_bytes': largest,
            'rss_before_bytes': before, 'peak_rss_bytes': peak,
            'conversion_peak_bytes': peak - before,
            'peak_over_model': round((peak - before) / total, 3),
            'peak_over_model_plus_largest': round((peak - before) / (total + largest), 3)}
  print(json.dumps(result, indent=2))
  shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  main()
