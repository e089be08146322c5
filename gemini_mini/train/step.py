"""The train state, its sharded initialisation, and the jitted train and eval steps.

The step is a pure function ``(TrainState, Batch) -> (TrainState, metrics)`` compiled once
with explicit input/output shardings and the old state donated. Gradient accumulation splits
the batch into ``grad_accum_steps`` micro-batches inside the step; the loss is accumulated as
sums and divided by the batch's token count once, so the gradient equals the full batch's.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gemini_mini import parallel
from gemini_mini.batch import Batch
from gemini_mini.config import ModelConfig
from gemini_mini.model import Decoder
from gemini_mini.train.loss import LossWeights, finalize, loss_sums


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array            # int32 scalar: optimizer steps taken
  params: nnx.State          # the Decoder's parameters (float32)
  opt_state: optax.OptState


def _state_factory(model_config: ModelConfig, optimizer, seed: int):
  def make_state():
    params = nnx.state(Decoder(model_config, rngs=nnx.Rngs(seed)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))
  return make_state


def abstract_train_state(model_config: ModelConfig, optimizer, mesh, seed: int):
  """``(graphdef, shardings, abstract_state)`` without allocating: the shardings come from
  the parameters' logical axis names, and ``abstract_state`` (shapes, dtypes, shardings) is
  the restore target for checkpoints."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(seed))))
  abstract = jax.eval_shape(_state_factory(model_config, optimizer, seed))
  shardings = parallel.state_shardings(abstract, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return graphdef, shardings, abstract


def init_train_state(model_config: ModelConfig, optimizer, shardings, seed: int,
                     start_from=None) -> TrainState:
  """A fresh state, created directly in its shards (no host copy of the full model).

  ``start_from``, given, maps the fresh parameters to those the run starts from
  (``runs.initial_params``: another run's, ``train.init_from``); the optimizer state is new.
  """
  if start_from is None:
    return jax.jit(_state_factory(model_config, optimizer, seed), out_shardings=shardings)()
  fresh = jax.jit(lambda: nnx.state(Decoder(model_config, rngs=nnx.Rngs(seed))),
                  out_shardings=shardings.params)()
  start = lambda params: TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                    opt_state=optimizer.init(params))
  return jax.jit(start, out_shardings=shardings)(start_from(fresh))


def _micro_batches(batch: Batch, count: int) -> Batch:
  """``[B, ...] -> [count, B / count, ...]`` taking rows ``i::count`` into micro-batch i, so a
  device's contiguous rows stay on that device."""
  def split(x):
    x = x.reshape(x.shape[0] // count, count, *x.shape[1:])
    return jnp.moveaxis(x, 1, 0)
  return jax.tree.map(split, batch)


def apply_gradients(state: TrainState, grads, optimizer, schedule) -> tuple[TrainState, dict]:
  """One optimizer update; returns the new state and ``grad_norm``, ``learning_rate`` and
  ``params_finite`` (whether every updated parameter is finite: the loop stops otherwise)."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params_finite = jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(params)]))
  return (TrainState(step=state.step + 1, params=params, opt_state=opt_state),
          {'grad_norm': optax.tree.norm(grads), 'learning_rate': schedule(state.step),
           'params_finite': params_finite})


def make_train_step(graphdef, optimizer, schedule, weights: LossWeights, grad_accum_steps: int,
                    teacher=None):
  """Returns the (unjitted) ``train_step(state, batch, teacher_params=None) -> (state,
  metrics)``. ``teacher`` (a ``Teacher``) adds the distillation term: the frozen teacher's
  logits of each micro-batch, computed in the same step and never differentiated."""

  def sums_and_grads(params, batch, teacher_params):
    teacher_logits_BTV = None if teacher is None else teacher.logits(teacher_params, batch)
    def objective(params):
      logits_BTV, aux = nnx.merge(graphdef, params)(batch)
      numerator, sums = loss_sums(logits_BTV, aux, batch, weights, teacher_logits_BTV,
                                  _temperature(teacher))
      return numerator, (sums, aux)
    (_, (sums, aux)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return grads, sums, {k: aux[k] for k in ('expert_load_LE', 'dropped_L')}

  def train_step(state: TrainState, batch: Batch, teacher_params=None):
    if grad_accum_steps == 1:
      grads, sums, router = sums_and_grads(state.params, batch, teacher_params)
    else:
      def accumulate(carry, micro_batch):
        grads, sums, router = sums_and_grads(state.params, micro_batch, teacher_params)
        return jax.tree.map(jnp.add, carry, (grads, sums, router)), None
      micro_batches = _micro_batches(batch, grad_accum_steps)
      first = jax.tree.map(lambda x: x[0], micro_batches)
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(sums_and_grads, state.params, first,
                                                          teacher_params))
      (grads, sums, router), _ = jax.lax.scan(accumulate, zeros, micro_batches)
      router = jax.tree.map(lambda x: x / grad_accum_steps, router)
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums['tokens'], 1.0), grads)
    state, update = apply_gradients(state, grads, optimizer, schedule)
    return state, {**finalize(sums, weights), **router, **update}

  return train_step


def make_eval_step(graphdef, weights: LossWeights, teacher=None):
  """``eval_step(params, batch, teacher_params=None) -> sums`` (add them over batches, then
  ``finalize``)."""
  def eval_step(params, batch: Batch, teacher_params=None):
    teacher_logits_BTV = None if teacher is None else teacher.logits(teacher_params, batch)
    logits_BTV, aux = nnx.merge(graphdef, params)(batch)
    return loss_sums(logits_BTV, aux, batch, weights, teacher_logits_BTV,
                     _temperature(teacher))[1]
  return eval_step


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen model's logits for the distillation term: its parameters are an argument of the
  jitted steps (``teacher_params``), behind ``stop_gradient``."""

  graphdef: nnx.GraphDef
  temperature: float

  def logits(self, params, batch: Batch) -> jax.Array:
    logits_BTV, _ = nnx.merge(self.graphdef, jax.lax.stop_gradient(params))(batch)
    return logits_BTV


def _temperature(teacher: Teacher | None) -> float:
  return 1.0 if teacher is None else teacher.temperature


def jit_steps(train_step, eval_step, state_shardings, mesh, teacher_shardings=None):
  """Compiles both steps with explicit shardings; the train state is donated. With
  ``teacher_shardings`` (those the teacher was restored with) the steps take the teacher's
  parameters as a third argument."""
  batch_sharding = parallel.batch_sharding(mesh)
  teacher = () if teacher_shardings is None else (teacher_shardings,)
  train = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding, *teacher),
                  out_shardings=(state_shardings, None), donate_argnums=0)
  evaluate = jax.jit(eval_step, in_shardings=(state_shardings.params, batch_sharding, *teacher))
  return train, evaluate
