"""The warm start as part of the data stream: the ``repeat`` task alone, then the mixture.

The copy (induction) circuit that retrieval needs forms on repeated spans alone
(``data.repeat_only_steps``, ``data.repeat_only_until_loss``). ``WarmStart`` hands out the
batches of a repeats-alone ``Mixture`` until the warm start ends, then those of the configured
mixture from its beginning. Whether it has ended is part of its state, saved in every
checkpoint with the current mixture's, so a resumed run reads what an uninterrupted one would.
"""

from gemini_mini.batch import Batch
from gemini_mini.data.mixture import Mixture


class WarmStart:
  """``next()`` gives ``repeats``' batches, then, once the warm start has ended, ``mixture``'s.

  The warm start lasts ``steps`` training steps; with ``until_loss`` > 0 it goes on until a
  step's copy loss falls below it, for at most ``2 * steps`` steps in all. The training loop
  reports each step's loss with ``after_loss`` (through ``Prefetch.report_loss``).
  """

  def __init__(self, repeats: Mixture, mixture: Mixture, *, steps: int, until_loss: float):
    """Starts with ``repeats`` when ``steps`` > 0; both iterators are fresh."""
    self._repeats, self._mixture = repeats, mixture
    self._steps, self._until_loss = steps, until_loss
    self._repeat_only = steps > 0
    self._mixture_start = dict(mixture.get_state(), repeat_only=False)

  def _current(self) -> Mixture:
    return self._repeats if self._repeat_only else self._mixture

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    return next(self._current())

  def position_shares(self) -> dict[str, float]:
    """The current iterator's ``Mixture.position_shares``."""
    return self._current().position_shares()

  def get_state(self) -> dict:
    """The current iterator's state, with ``repeat_only``: whether it is the warm start's."""
    return dict(self._current().get_state(), repeat_only=self._repeat_only)

  def set_state(self, state: dict) -> None:
    """Continues exactly where the ``WarmStart`` that gave ``state`` stopped.

    A state saved before the warm start was part of the stream (before issue 34) has no
    ``repeat_only``: it was the warm start's when it holds the ``repeat`` task alone.
    """
    self._repeat_only = state.get('repeat_only', state['tasks'] == ['repeat'])
    self._current().set_state(state)

  def after_loss(self, state: dict, step: int, loss: float) -> dict:
    """The state that the step after ``step`` reads from, given that training step ``step``
    (whose cross entropy was ``loss``) read the last batch of ``state``: the mixture's start
    when that step ends the warm start, else ``state`` itself.

    A function of its arguments alone, so ``Prefetch`` can ask it while its thread builds
    batches ahead.
    """
    if not state['repeat_only'] or step < self._steps:
      return state
    ends = (not self._until_loss or loss < self._until_loss or step >= 2 * self._steps)
    return dict(self._mixture_start) if ends else state
