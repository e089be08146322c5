"""Builds a ``Mixture``'s next batches in a background thread while the device runs a step.

Without it, the training loop builds each batch after the previous step has finished: on
a GPU the card waits for the host (a batch of 16 text rows of 2,048 tokens takes about 50
ms on one core; the whole step of the 8-layer model on an H200 took about 160 ms).
``Prefetch`` runs the same iterator, in the same order, ``depth`` batches ahead, so the
batches are exactly the unwrapped iterator's; ``get_state`` and ``position_shares`` are
those after the last batch handed out, not after the ones built ahead, so a checkpoint
resumes at the next unread batch. When a reported loss changes what comes next (the end of
``curriculum.WarmStart``), the batches built ahead are dropped and built again.
"""

import queue
import threading

from gemini_mini.batch import Batch
from gemini_mini.data.curriculum import WarmStart
from gemini_mini.data.mixture import Mixture


class Prefetch:
  """``next()`` gives the wrapped iterator's batches, built ``depth`` ahead in a thread.

  The ``Mixture`` or ``WarmStart`` belongs to the thread once wrapped: call its ``set_state``
  before, and this object's ``get_state`` / ``position_shares`` / ``report_loss`` after. An
  error the thread meets while building a batch is raised by the ``next()`` that would have
  returned that batch. ``close()`` stops the thread (the batches built ahead are dropped).
  """

  def __init__(self, source: Mixture | WarmStart, depth: int = 2):
    if depth < 1:
      raise ValueError(f'depth must be >= 1 (got {depth}); unwrap the Mixture for none')
    self._source, self._depth = source, depth
    self._state, self._shares = source.get_state(), source.position_shares()
    self._start()

  def _start(self) -> None:
    self._ready = queue.Queue(maxsize=self._depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._build, name='prefetch', daemon=True)
    self._thread.start()

  def _build(self) -> None:
    while not self._stop.is_set():
      try:
        item = (next(self._source), self._source.get_state(), self._source.position_shares())
      except Exception as error:  # handed to the consumer, which raises it
        item = error
      while not self._stop.is_set():
        try:
          self._ready.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if isinstance(item, Exception):
        return

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    if self._stop.is_set():
      raise RuntimeError('this Prefetch was closed')
    item = self._ready.get()
    if isinstance(item, Exception):
      self.close()
      raise item
    batch, self._state, self._shares = item
    return batch

  def get_state(self) -> dict:
    """The wrapped iterator's state after the last batch ``next()`` returned."""
    return self._state

  def position_shares(self) -> dict[str, float]:
    """The wrapped iterator's ``position_shares`` after the last batch ``next()`` returned."""
    return self._shares

  def report_loss(self, step: int, loss: float) -> bool:
    """Tells a ``WarmStart`` source the loss of ``step``, the training step that read the last
    batch handed out; returns whether that changed the batches to come, which are then built
    from the changed state."""
    state = self._source.after_loss(self._state, step, loss)
    if state is self._state:
      return False
    self.close()
    self._source.set_state(state)
    self._state, self._shares = state, self._source.position_shares()
    self._start()
    return True

  def close(self) -> None:
    self._stop.set()
    self._thread.join()
