"""Train state and the jitted, sharded train step shared by every model family.

The step is `jax.jit` with explicit in/out shardings and the state donated, so parameters and
optimiser state are updated in place on their shards. Families differ only in their
`objective(model, params, batch, rng=, train=) -> (loss, metrics)`.
"""

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vlm import parallel

Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


@jax.tree_util.register_pytree_node_class
class InitKwargs(dict):
  """Keyword inputs of model.init, as the last of an objective's init_args (a pytree, so the values may be
  abstract like the positional ones): e.g. {'videos': clips} for a model whose video params exist only
  when it sees a clip."""

  def tree_flatten(self):
    keys = sorted(self)
    return [self[k] for k in keys], keys

  @classmethod
  def tree_unflatten(cls, keys, values):
    return cls(zip(keys, values))


def _init_fn(model: nn.Module) -> Callable:
  """rng, *example inputs -> the model's (boxed) params; the inputs are arguments, so they may be abstract.
  A trailing InitKwargs goes to model.init as keyword arguments."""

  def init(rng, *args):
    if args and isinstance(args[-1], InitKwargs):
      return model.init({"params": rng}, *args[:-1], **args[-1])["params"]
    return model.init({"params": rng}, *args)["params"]

  return init


def _state_around(
  tx: optax.GradientTransformation, mesh: Mesh, params, param_shardings, rng
) -> tuple[TrainState, TrainState]:
  """(abstract state, state shardings) for params (arrays or abstract) and the state rng.

  The optimiser state's leaves that copy a parameter (Adam's mu and nu, ...) get that parameter's
  sharding (parallel.follow_shardings); counts and factored statistics are replicated.
  """
  opt_state = jax.eval_shape(tx.init, params)
  rep = parallel.replicated(mesh)
  shardings = TrainState(
    step=rep,
    params=param_shardings,
    opt_state=parallel.follow_shardings(opt_state, params, param_shardings, mesh),
    rng=rep,
  )
  step = jax.ShapeDtypeStruct((), jnp.int32)
  abstract = TrainState(step=step, params=params, opt_state=opt_state, rng=jax.eval_shape(lambda k: k, rng))
  return parallel.with_shardings(abstract, shardings), shardings


def abstract_train_state(
  model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules, init_args: tuple, seed: int = 0
) -> tuple[TrainState, TrainState]:
  """The TrainState that create_train_state would make, as jax.ShapeDtypeStructs carrying their
  NamedShardings, computed with jax.eval_shape: nothing is allocated (e.g. to lower and compile a
  step for a mesh bigger than any machine at hand, `make_train_step(...).compiled(state, batch)`).

  init_args may be abstract (jax.ShapeDtypeStruct). Returns (abstract_state, state_shardings).
  """
  params_rng, state_rng = jax.eval_shape(lambda: tuple(jax.random.split(jax.random.key(seed))))
  params, param_shardings = parallel.abstract_sharded(_init_fn(model), mesh, rules, params_rng, *init_args)
  return _state_around(tx, mesh, params, param_shardings, state_rng)


def create_train_state(
  model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules, init_args: tuple, seed: int = 0
) -> tuple[TrainState, TrainState]:
  """Initialises params straight into their shardings, then the optimiser state beside them.

  init_args: example inputs for `model.init` (shapes matter, values do not).
  Returns (state, state_shardings); `abstract_train_state` gives the same without allocating.
  """
  params_rng, state_rng = jax.random.split(jax.random.key(seed))
  params, param_shardings = parallel.init_sharded(_init_fn(model), mesh, rules, params_rng, *init_args)
  _, shardings = _state_around(tx, mesh, params, param_shardings, state_rng)
  # jit with out_shardings, not device_put: in a multi-host run `rep` spans other processes' devices.
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  state = TrainState(
    step=jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=shardings.step)(),
    params=params,
    opt_state=opt_state,
    rng=jax.jit(lambda k: k, out_shardings=shardings.rng)(state_rng),
  )
  return state, shardings


def make_train_step(
  model: nn.Module,
  objective: Objective,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  rules,
  state_shardings: TrainState,
  accum_steps: int = 1,
  compiler_options: dict[str, Any] | None = None,
) -> Callable:
  """Returns step(state, batch) -> (state, metrics), jitted with shardings and donation.

  The step also has `.flops(state, batch)` (XLA's FLOP count per device), `.lower(state, batch)` and
  `.compiled(state, batch)` (the jax Lowered / Compiled, compiled once); those three accept
  abstract inputs (jax.ShapeDtypeStructs with shardings, e.g. from abstract_train_state).

  accum_steps > 1 splits the (global) batch into that many micro-batches and averages their
  gradients with a scan (memory of one micro-batch). For contrastive objectives this changes
  the set of negatives per loss term: each micro-batch is its own contrastive batch.

  compiler_options: XLA options for this program's compilation only (jax's per-compilation
  `compiler_options`: XLA flag names without '--', e.g. {'xla_gpu_enable_latency_hiding_scheduler':
  True}); the rest of the process keeps its XLA_FLAGS.
  """
  rules = parallel.filter_rules(rules, mesh)
  compiler_options = dict(compiler_options or {}) or None

  def grads_of(params, batch, rng):
    def loss_fn(p):
      return objective(model, p, batch, rng=rng, train=True)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, metrics, grads

  def step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    if accum_steps == 1:
      loss, metrics, grads = grads_of(state.params, batch, rng)
    else:
      micro = jax.tree.map(lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

      def body(carry, xs):
        i, mb = xs
        loss, metrics, grads = grads_of(state.params, mb, jax.random.fold_in(rng, i))
        acc = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
        return acc, None

      zeros = jax.eval_shape(lambda: grads_of(state.params, jax.tree.map(lambda x: x[0], micro), rng))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
      (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
      loss, metrics, grads = jax.tree.map(lambda x: x / accum_steps, (loss, metrics, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  batch_sharding = parallel.batch_sharding(mesh)  # a prefix: every batch leaf is batch-major
  jitted = jax.jit(
    step,
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, parallel.replicated(mesh)),
    donate_argnums=(0,),
  )

  compiled = {}  # compiled once, on the first batch; also gives the FLOP count

  def lower(state: TrainState, batch: dict[str, jax.Array]) -> jax.stages.Lowered:
    """The step lowered for (state, batch): arrays, or jax.ShapeDtypeStructs with their shardings
    (abstract_train_state and an abstract batch: nothing allocated)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted.lower(state, batch)

  def compile_for(state: TrainState, batch: dict[str, jax.Array]) -> jax.stages.Compiled:
    if "step" not in compiled:
      lowered = lower(state, batch)
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled["step"] = lowered.compile(compiler_options=compiler_options)
    return compiled["step"]

  def run(state: TrainState, batch: dict[str, jax.Array]):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return compile_for(state, batch)(state, batch)

  def cost(state: TrainState, batch: dict[str, jax.Array]) -> float | None:
    """XLA's FLOP count of one compiled step PER DEVICE: the compiled program is one partition of the
    SPMD step (x the device count for the whole step). None where the backend gives none."""
    analysis = compile_for(state, batch).cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"]) if analysis and "flops" in analysis else None

  run.flops = cost
  run.lower = lower
  run.compiled = compile_for  # the jax Compiled (memory_analysis, cost_analysis); inputs may be abstract
  return run
