"""The evaluation suites of ``eval.py``, one module each, every one a ``run(loaded, out_dir)``.

``SUITES`` maps a suite's name (``--suite``) to its module; ``common`` holds what they share
(result files, scoring, batched generation). A suite that does not apply to the loaded run's
``train.stage`` writes nothing and returns ``{'skipped': reason}``, so ``--suite all`` runs on
any stage.
"""

import importlib

SUITES = {
    'perplexity': 'gemini_mini.evals.perplexity',
    'haystack': 'gemini_mini.evals.haystack',
    'multi-needle': 'gemini_mini.evals.multi_needle',
    'ruler': 'gemini_mini.evals.ruler',
    'tasks': 'gemini_mini.evals.tasks',
    'self-consistency': 'gemini_mini.evals.self_consistency',
    'factuality': 'gemini_mini.evals.factuality',
    'preference': 'gemini_mini.evals.preference',
}


def suite(name: str):
  """The module of suite ``name``; raises ``KeyError`` naming the valid suites."""
  if name not in SUITES:
    raise KeyError(f'unknown suite {name!r}; use one of {", ".join(SUITES)} or all')
  return importlib.import_module(SUITES[name])
