"""The objective registry, and the checks objectives run on their options when built."""

import dataclasses
from collections.abc import Sequence

from vlm.registry import Registry, to_kwargs

OBJECTIVES: Registry = Registry("objective")


def check_choice(key: str, value, choices: Sequence) -> None:
  """ValueError naming `objective.<key>`, the value and the valid choices when value is not one of them."""
  if value not in tuple(choices):
    raise ValueError(f"config.objective.{key}: unknown value {value!r}; valid: {', '.join(map(repr, choices))}")


def check_contrastive(loss: str, impl: str) -> None:
  """The options of the shared contrastive loss (vlm.losses.contrastive's kinds and implementations)."""
  from vlm.losses import IMPLS, KINDS

  check_choice("loss", loss, KINDS)
  check_choice("impl", impl, IMPLS)


def build_objective(name: str, config, mesh=None):
  """OBJECTIVES[name](mesh=mesh, **config); an option the objective does not have is a ValueError listing
  the ones it has (its own checks of option values run in its __post_init__, before anything compiles)."""
  cls = OBJECTIVES.get(name)
  kwargs = to_kwargs(config or {})
  if dataclasses.is_dataclass(cls):
    fields = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "mesh"]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
      raise ValueError(
        f"config.objective: {name!r} has no option {', '.join(unknown)}; its options: {', '.join(fields)}"
      )
  return cls(mesh=mesh, **kwargs)
