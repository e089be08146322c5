"""The README's commands are the ones CI and users actually run."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_commands():
  return re.findall(r'```bash\n(.*?)\n```', (ROOT / 'README.md').read_text(), re.S)


def test_ci_runs_exactly_the_readme_test_command():
  test_command = next(c for c in readme_commands() if 'pytest' in c)
  ci_lines = (ROOT / '.ci/run').read_text().splitlines()
  assert test_command in ci_lines


def test_readme_main_job_trains_the_default_model():
  assert any(c.endswith('python train.py') for c in readme_commands())
