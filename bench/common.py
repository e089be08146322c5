"""Shared helpers for ``bench/*.py``: timing, a printed table and the ``--json`` output."""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time

import jax

GIB = 2**30


def add_common_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  parser.add_argument('--json', metavar='FILE', help='also write the figures to this JSON file')
  parser.add_argument('--warmup', type=int, default=2, help='untimed calls after compiling')
  parser.add_argument('--repeats', type=int, default=5, help='timed calls')
  return parser


def time_fn(fn, *args, warmup: int = 2, repeats: int = 5) -> dict:
  """Seconds per call of ``fn(*args)`` (min and median over ``repeats``), after ``warmup``.

  The first warm-up call also compiles a ``jax.jit`` function; every call is waited for with
  ``jax.block_until_ready``.
  """
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return {'min_s': min(times), 'median_s': statistics.median(times), 'repeats': repeats}


def environment() -> dict:
  """What the figures were measured on."""
  return {'jax': jax.__version__, 'backend': jax.default_backend(),
          'device': jax.devices()[0].device_kind, 'cpus': os.cpu_count(),
          'time': time.strftime('%Y-%m-%d %H:%M:%S')}


def torch_device() -> str:
  """The torch device a peer runs on to match JAX's backend here: 'cuda' on a GPU, else 'cpu'."""
  return 'cuda' if jax.default_backend() == 'gpu' else 'cpu'


def describe(figures: dict) -> str:
  return ', '.join(f'{key} {value}' for key, value in figures.items())


def print_table(headers: list[str], rows: list[list]) -> None:
  """Left-aligned first column, right-aligned others; floats as given (pre-format them)."""
  cells = [[str(c) for c in row] for row in [headers, *rows]]
  widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
  for n, row in enumerate(cells):
    print('  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(row, widths))))
    if n == 0:
      print('  '.join('-' * w for w in widths))


def write_json(path: str | None, figures: dict) -> None:
  if path:
    with open(path, 'w') as f:
      json.dump(figures, f, indent=2)
    print(f'wrote {path}')


def format_bytes(num_bytes: float | None) -> str:
  if num_bytes is None:
    return '-'
  return f'{num_bytes / 2**20:.0f} MiB' if num_bytes < GIB else f'{num_bytes / GIB:.2f} GiB'


def peer_python(given: str) -> str | None:
  """The interpreter ``--hf-python`` names, as a path: a file, or a command on ``PATH``
  (``python3``); None when neither exists."""
  if os.path.isfile(given):
    return given
  return shutil.which(given)


def run_peer_script(name: str, command: list[str], env: dict | None = None,
                    timeout: float | None = None, cwd=None) -> dict:
  """Runs a peer's benchmark script (``bench/peers/``) in a subprocess, echoing its output as
  ``  | line``, and returns the JSON of its ``peer_result {...}`` line plus ``wall_s``; or
  ``{'failed': why, 'tail': last lines}`` when it exits non-zero, prints no result, or runs
  past ``timeout`` seconds."""
  print(f'\n== {name}: {" ".join(command)}', flush=True)
  start = time.perf_counter()
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, **(env or {})}, cwd=cwd)
  result, lines = None, []
  try:
    deadline = None if timeout is None else start + timeout
    for line in process.stdout:
      line = line.rstrip('\n')
      lines.append(line)
      if line.startswith('peer_result '):
        result = json.loads(line[len('peer_result '):])
      else:
        print(f'  | {line}', flush=True)
      if deadline is not None and time.perf_counter() > deadline:
        raise subprocess.TimeoutExpired(command, timeout)
    process.wait(timeout=None if deadline is None else max(deadline - time.perf_counter(), 1))
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
    return {'failed': f'timed out after {timeout} s', 'tail': lines[-10:]}
  if process.returncode != 0 or result is None:
    return {'failed': f'exit code {process.returncode}', 'tail': lines[-10:]}
  result['wall_s'] = time.perf_counter() - start
  return result
