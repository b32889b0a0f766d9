"""Name -> constructor registries, so configs pick models, objectives and evaluations by string."""

from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """A named table of constructors. `@REG.register('name')` adds one; `REG.get('name')` fetches it."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def deco(obj: T) -> T:
      if name in self._entries and self._entries[name] is not obj:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._entries[name] = obj
      return obj

    return deco

  def get(self, name: str) -> T:
    if name not in self._entries:
      raise ValueError(f"unknown {self.kind} {name!r}; known: {sorted(self._entries)}")
    return self._entries[name]

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def items(self) -> list[tuple[str, T]]:
    return sorted(self._entries.items(), key=lambda kv: kv[0])


def to_kwargs(cfg: Any) -> dict[str, Any]:
  """A ConfigDict/dict of constructor arguments -> plain dict (nested dicts stay dicts, lists -> tuples)."""
  if hasattr(cfg, "to_dict"):
    cfg = cfg.to_dict()

  def conv(v):
    if isinstance(v, dict):
      return {k: conv(x) for k, x in v.items()}
    if isinstance(v, list):
      return tuple(conv(x) for x in v)
    return v

  return {k: conv(v) for k, v in dict(cfg).items()}
