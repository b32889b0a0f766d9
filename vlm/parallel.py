"""Device meshes, logical-axis rules, shardings, sharded initialisation and multi-host helpers.

Parameters and activations carry logical axis names (see vlm.nn). A config maps them to mesh
axes with `rules`, e.g. ('embed', 'fsdp'): FSDP shards every parameter's embedding dim, and
('act_batch', ('data', 'fsdp')) shards the batch over both data-parallel axes.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# Data axes: the batch is split over these; contrastive losses gather over them.
DATA_AXES = ("data", "fsdp")

# Logical name -> mesh axes. Parameters: embed/mlp/heads/kv/vocab/...; activations: act_*.
# Logical axis rules: (logical axis name, mesh axis or axes or None) pairs, flax's form.
Rules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: Rules = (
  ("act_batch", DATA_AXES),
  ("act_len", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_mlp", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv", None),
  ("vocab", "tensor"),
  ("proj", None),
  ("pos", None),
  ("norm", None),
  ("layers", None),
)


def make_mesh(axes: Sequence[tuple[str, int]] | dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh from [(name, size), ...]; one size may be -1 (all remaining devices).

  Axis types are Auto (the compiler propagates shardings from our constraints).
  """
  items = list(axes.items()) if isinstance(axes, dict) else [tuple(a) for a in axes]
  devices = list(jax.devices() if devices is None else devices)
  names = [n for n, _ in items]
  sizes = [int(s) for _, s in items]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may have size -1, got {items}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {items}: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes))} needs {int(np.prod(sizes))} devices, have {len(devices)}")
  return jax.make_mesh(tuple(sizes), tuple(names), axis_types=(AxisType.Auto,) * len(names), devices=devices)


def data_axes(mesh: Mesh | None) -> tuple[str, ...]:
  """The data-parallel axes present in `mesh` (the batch is sharded over them); () without a mesh."""
  if mesh is None:
    return ()
  return tuple(a for a in DATA_AXES if a in mesh.axis_names)


def shard_map_or_call(fn: Callable, mesh: Mesh | None, args: tuple, in_specs: tuple, out_specs: Any) -> Any:
  """fn(*args) on each device's shards under `jax.shard_map` over `mesh`; without a mesh, fn(*args)."""
  if mesh is None:
    return fn(*args)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(*args)


def filter_rules(rules: Sequence[tuple[str, Any]], mesh: Mesh) -> tuple[tuple[str, Any], ...]:
  """Drops mesh axes that `mesh` lacks from the rules (so one rule set serves every mesh)."""
  out = []
  for name, axes in rules:
    if axes is None:
      out.append((name, None))
      continue
    kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in mesh.axis_names)
    out.append((name, kept[0] if len(kept) == 1 else (kept or None)))
  return tuple(out)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes from dims they do not divide evenly (those dims stay replicated)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for a in axes_t:
      if dim % (int(np.prod([mesh.shape[k] for k in kept])) * mesh.shape[a]) == 0:
        kept.append(a)
    fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*fitted)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """Shardings (unboxed tree structure) for a tree of `nn.Partitioned` abstract values."""
  rules = filter_rules(rules, mesh)
  specs = nn.get_partition_spec(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = nn.meta.unbox(abstract_boxed)
  return jax.tree.map(
    lambda s, x: NamedSharding(mesh, _fit_spec(s, x.shape, mesh)),
    mesh_specs,
    shapes,
    is_leaf=lambda s: isinstance(s, P),
  )


def abstract_sharded(
  init_fn: Callable[..., Any], mesh: Mesh, rules: Sequence[tuple[str, Any]], *args
) -> tuple[Any, Any]:
  """The (boxed) variable tree `init_fn(*args)` would give, without allocating it: returns (unboxed
  jax.ShapeDtypeStructs carrying their NamedShardings, shardings). args may be abstract too."""
  abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_shardings(abstract, mesh, rules)
  return with_shardings(nn.meta.unbox(abstract), shardings), shardings


def with_shardings(tree: Any, shardings: Any) -> Any:
  """Arrays or abstract values -> jax.ShapeDtypeStructs of their shapes and dtypes with `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def follow_shardings(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree that holds copies of `params` (an optimiser state): a leaf whose key path
  ends with a parameter's path and has its shape gets that parameter's sharding (the longest such
  path wins); every other leaf (step counts, Adafactor's factored row/column statistics) is replicated.
  """

  def keys(path):
    return tuple(str(k) for k in path)

  table = {
    keys(path): (x.shape, s)
    for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shardings))
  }
  rep = replicated(mesh)

  def one(path, x):
    path = keys(path)
    for start in range(len(path)):
      shape, sharding = table.get(path[start:], (None, None))
      if sharding is not None:
        return sharding if tuple(shape) == tuple(x.shape) else rep
    return rep

  return jax.tree_util.tree_map_with_path(one, tree)


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules: Sequence[tuple[str, Any]], *args) -> tuple[Any, Any]:
  """Initialises a (boxed) variable tree directly into its shardings; returns (unboxed values, shardings).

  `jax.eval_shape` gives the shapes and logical names without allocating (`abstract_sharded`); a
  jitted init with `out_shardings` then materialises each shard on its own device.
  """
  _, shardings = abstract_sharded(init_fn, mesh, rules, *args)
  # No mesh context here: DenseGeneral initialises kernels in a flattened shape, which
  # flax's init-time sharding constraints would reject. out_shardings place everything.
  values = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return values, shardings


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch-major array: dim 0 over the data axes, the rest replicated."""
  return NamedSharding(mesh, P(data_axes(mesh), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch: Any, mesh: Mesh, global_batch: int | None = None) -> Any:
  """Host-local numpy batch (this process's rows) -> global jax.Arrays sharded over the data axes.

  global_batch: the global leading dimension (default: inferred, local rows x processes).
  """

  def one(x):
    x = np.asarray(x)
    shape = None if global_batch is None else (global_batch, *x.shape[1:])
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, shape)

  return jax.tree.map(one, batch)


def maybe_initialize_distributed(
  coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
  """Calls `jax.distributed.initialize` when the run spans processes; returns whether it did.

  Call it first, before anything touches a JAX device. Three cases:
    - explicit: `num_processes` > 1 with `coordinator` ('host:port' of process 0) and `process_id`
      (the trainer's --coordinator_address/--num_processes/--process_id flags);
    - environment: no `num_processes`, but JAX_COORDINATOR_ADDRESS is set (JAX then reads
      JAX_NUM_PROCESSES / JAX_PROCESS_ID), or VLM_DISTRIBUTED=1 asks for JAX's cluster
      auto-detection (Cloud TPU pods, SLURM, Open MPI, Kubernetes);
    - otherwise (one process): nothing.
  Cross-process collectives on CPU devices need an implementation; unless one is configured,
  gloo is used (loopback or TCP), so local multi-process runs and tests work without a cluster.
  """
  import os

  if num_processes is None:
    if not (os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("VLM_DISTRIBUTED", "") not in ("", "0")):
      return False
  elif num_processes <= 1:
    return False
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # Arguments left None are filled in by JAX from JAX_* variables or the detected cluster.
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  return True
