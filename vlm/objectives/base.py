"""The objective registry."""

from vlm.registry import Registry, to_kwargs

OBJECTIVES: Registry = Registry("objective")


def build_objective(name: str, config, mesh=None):
  """OBJECTIVES[name](mesh=mesh, **config)."""
  return OBJECTIVES.get(name)(mesh=mesh, **to_kwargs(config or {}))
