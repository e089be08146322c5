"""What a training stage gives ``loop.run``, which does the rest (mesh, checkpoints, resume,
signals, logging): ``loop.LanguageModelStage`` (pretrain, sft), ``preference.PreferenceStage``
(reward, dpo), ``rlhf.RLHFStage``."""

import abc

from gemini_mini.train import runs
from gemini_mini.train.step import init_train_state


class Stage(abc.ABC):
  """The interface, with the hooks most stages leave as they are.

  Attributes:
    config, mesh: the run's.
    optimizer, shardings: the train state's optimizer and shardings.
    abstract: the train state's restore target (shapes, dtypes, shardings).
    tokens_per_step, flops_per_step: for ``tokens_per_s`` and MFU.
  """

  config = mesh = optimizer = shardings = abstract = None
  tokens_per_step: int = 0
  flops_per_step: float = 0.0

  @abc.abstractmethod
  def datasets(self) -> dict[str, float]:
    """Task weights whose datasets must be prepared (``prepare.ensure``)."""

  def init_state(self):
    """The state of step 0: fresh parameters, or ``train.init_from``'s, checked before
    anything is compiled (a bad run is named at once), with a new optimizer state."""
    config = self.config
    start_from = None
    if config.train.init_from:
      start = runs.check_start(config)
      start_from = lambda fresh: runs.initial_params(start, self.mesh, fresh)
    return init_train_state(config.model, self.optimizer, self.shardings, config.train.seed,
                            start_from)

  @abc.abstractmethod
  def open_data(self, state: dict | None) -> None:
    """Opens the data stream, at the saved ``state`` when resuming."""

  @abc.abstractmethod
  def data_state(self) -> dict:
    """The stream's state (JSON), saved with each checkpoint."""

  @abc.abstractmethod
  def train(self, state, step: int):
    """One step: ``(state, metrics)``, the metrics holding ``loss`` and ``params_finite``."""

  def evaluate(self, params) -> dict:
    """Held-out figures (``eval/...``) every ``train.eval_every`` steps; none by default."""
    del params
    return {}

  def log_values(self) -> dict:
    """More figures for each logged step; none by default."""
    return {}

  def after_step(self, step: int, metrics: dict) -> str | None:
    """Called after each step (before its checkpoint); a message to print, or None."""
    del step, metrics
    return None

  def close(self) -> None:
    """Stops what ``open_data`` started."""
