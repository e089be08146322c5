"""Parameter counts of a config, total and active per token, without allocating anything.

    python -m gemini_mini.param_count [CONFIG ...]     # default: every configs/*.yaml

"Active per token" counts what one token's forward pass touches: everything except the
routed experts it was not sent to, i.e. ``total - (E - k) / E * routed expert parameters``
(the image and audio encoders are counted; a text token does not use them).
``param_shapes`` lists every parameter's path and shape.
"""

import argparse
import pathlib
import sys

import jax
import numpy as np
from flax import nnx

from gemini_mini import config as config_lib
from gemini_mini.config import ModelConfig
from gemini_mini.layers import MoE
from gemini_mini.model import Decoder


def count_params(model_config: ModelConfig) -> dict[str, int]:
  """``{'total': ..., 'active': ...}`` from the shapes of ``Decoder(model_config)``."""
  decoder = nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0)))
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(tree, nnx.Param)))
  total = size(decoder)
  inactive = 0
  for _, module in nnx.iter_modules(decoder):
    if isinstance(module, MoE):
      routed = sum(int(np.prod(p.shape)) for p in (module.gate_EDF, module.up_EDF, module.down_EFD))
      inactive += routed * (module.num_experts - module.experts_per_token) // module.num_experts
  return {'total': total, 'active': total - inactive}


def param_shapes(model_config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every parameter of ``Decoder(model_config)`` as ``{path: shape}``, without allocating.

  A path joins the attribute names down to the parameter with ``/``, e.g.
  ``'blocks/1/ffn/gate_EDF': (E, D, F)`` (layer 1's expert gates; the suffix names the axes,
  see ``layers/__init__.py``), in ``nnx.state``'s order: by attribute name (``audio``,
  ``blocks`` layer by layer, ``final_norm``, ``image``, ``text``). With ``scan_layers`` the
  blocks are ``groups/blocks/j/...``, each with a leading ``[num_layers / moe_every]`` axis.
  The sizes add up to ``count_params(model_config)['total']``.
  """
  decoder = nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0)))
  return {'/'.join(str(key) for key in path): tuple(param.shape)
          for path, param in nnx.to_flat_state(nnx.state(decoder, nnx.Param))}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('configs', nargs='*', help='YAML configs (default: configs/*.yaml)')
  args = parser.parse_args(argv)
  paths = args.configs or sorted(pathlib.Path('configs').glob('*.yaml'))
  print(f'{"config":<24}{"total":>16}{"active/token":>16}')
  for path in paths:
    try:
      counts = count_params(config_lib.load(path).model)
    except config_lib.ConfigError as error:
      print(error, file=sys.stderr)
      return 2
    print(f'{str(path):<24}{counts["total"]:>16,}{counts["active"]:>16,}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
