"""Evaluation registry and helpers to run a model over a numpy split on the mesh."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from vlm import parallel
from vlm.data import load_split_numpy
from vlm.registry import Registry, to_kwargs

EVALS: Registry = Registry("evaluation")


def build_evals(config, model: nn.Module, mesh: Mesh) -> dict[str, Any]:
  """{name: evaluator} from `config.evals`; each entry has `type` and its kwargs (plus `every`).

  Evaluators see the model only through its predict functions (vlm.models.registry.PREDICT_FNS) and the
  run only through its data options and logical axis rules:
  EVALS[type](data=config.data, rules=config.rules, predict_fns=, mesh=, prefix=name, **kwargs)."""
  from vlm.models.registry import predict_fns

  fns = predict_fns(model)
  data, rules = config.data, config.get("rules", parallel.DEFAULT_RULES)
  out = {}
  for name, cfg in (config.get("evals") or {}).items():
    kw = to_kwargs(cfg)
    kind = kw.pop("type", name)
    kw.pop("every", None)
    out[name] = EVALS.get(kind)(data=data, rules=rules, predict_fns=fns, mesh=mesh, prefix=name, **kw)
  return out


def batched_apply(fn: Callable[[Any, Any], jax.Array], params: Any, x: Any, mesh: Mesh, batch_size: int) -> np.ndarray:
  """Runs jitted fn(params, batch) over x (an array [N, ...] or a tuple/pytree of them) in batches
  sharded on the data axes; pads the last one. fn may return an array or a pytree of arrays [n, ...]."""
  n_data = int(np.prod([mesh.shape[a] for a in parallel.data_axes(mesh)])) // max(jax.process_count(), 1)
  bs = max(n_data, batch_size - batch_size % n_data)
  n = len(jax.tree.leaves(x)[0])
  outs = []
  for i in range(0, n, bs):
    rows = min(bs, n - i)
    pad = (-rows) % n_data

    def chunk(a):
      c = a[i : i + bs]
      return np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) if pad else c

    out = jax.device_get(fn(params, parallel.shard_batch(jax.tree.map(chunk, x), mesh)))
    outs.append(jax.tree.map(lambda o: np.asarray(o)[:rows], out))
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)


class SplitData:
  """Mixin for evaluators: `data()` loads `self.data_config`'s `self.split` (at most
  `self.max_examples` rows) with load_split_numpy once, on first use, and keeps it."""

  _data = None

  def data(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if self._data is None:
      self._data = load_split_numpy(self.data_config, self.split, max_examples=self.max_examples)
    return self._data


def jit_on_mesh(fn: Callable[[Any, jax.Array], jax.Array], mesh: Mesh, rules) -> Callable:
  """jax.jit(fn)(params, x), run inside `mesh` and the logical axis `rules` (for batched_apply)."""
  rules = parallel.filter_rules(rules, mesh)
  jitted = jax.jit(fn)

  def run(params, x):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(params, x)

  return run
