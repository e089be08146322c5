"""The dimension key (``gemini_mini/layers/__init__.py``) names every letter that the layers
and the model use in shape suffixes (``x_BTD``) and einsum strings, one meaning per letter."""

import pathlib
import re

import gemini_mini
from gemini_mini import layers

PACKAGE = pathlib.Path(gemini_mini.__file__).parent
# A shape suffix holds at least one capital: ``x_BTD``, ``q_nBKQH``; ``load_balance`` has none.
SUFFIX = re.compile(r'\b[a-z][a-z0-9]*(?:_[a-z0-9]+)*_([A-Za-z]*[A-Z][A-Za-z]*)\b')
EINSUM = re.compile(r"'([A-Za-z]+(?:,[A-Za-z]+)*->[A-Za-z]+)'")


def key_letters() -> dict[str, int]:
  """Each letter the key defines, with how many times it is defined."""
  doc = layers.__doc__
  key = doc[doc.index('Dimension key'):doc.index('Host-side')].splitlines()[3:]
  counts = {}
  for line in key:
    for match in re.finditer(r'(?:^|\s{2,})([A-Za-z](?:, [A-Za-z])*)  ', line):
      for letter in match.group(1).split(', '):
        counts[letter] = counts.get(letter, 0) + 1
  return counts


def test_each_letter_is_defined_once():
  counts = key_letters()
  assert {'B', 'T', 'S', 'D', 'E', 'R', 'W', 'X'} <= set(counts)  # the parser reads the key
  assert {letter for letter, count in counts.items() if count > 1} == set()


def test_every_letter_the_layers_and_model_use_is_in_the_key():
  defined = set(key_letters())
  undefined = []
  for path in sorted((PACKAGE / 'layers').glob('*.py')) + [PACKAGE / 'model.py']:
    source = path.read_text()
    names = [m.group(0) for m in SUFFIX.finditer(source)] + [
        m.group(1) for m in EINSUM.finditer(source)]
    for name in names:
      letters = SUFFIX.fullmatch(name).group(1) if SUFFIX.fullmatch(name) else name
      missing = set(letters.replace(',', '').replace('->', '')) - defined
      if missing:
        undefined.append(f'{path.name}: {name} ({"".join(sorted(missing))})')
  assert not undefined, 'letters missing from the key:\n' + '\n'.join(undefined)
