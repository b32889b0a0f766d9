"""Parameter trees by '/'-joined paths, e.g. 'img/encoder/block_3/attn/query/kernel', and regexes on them.

The bottom of vlm's import graph (it imports nothing from vlm): vlm.optim, vlm.peft and vlm.checkpoint
share these helpers so that a path means the same thing in freezing, PEFT and checkpoint loading.
"""

import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
from flax import traverse_util
from flax.core import meta


def path_str(path: tuple) -> str:
  """A jax tree path (of DictKey / GetAttrKey / SequenceKey entries) -> 'a/b/c'."""
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def tree_paths(tree: Any) -> Any:
  """The same tree with each leaf replaced by its '/'-joined path."""
  return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), tree)


def flatten(tree: Any, *, unbox: bool = True) -> dict[str, Any]:
  """A nested dict (or FrozenDict) of parameters -> {'/'-joined path: leaf}.

  unbox: first strip flax's partitioning metadata (nn.Partitioned boxes; this returns the dicts in
  sorted key order, as jax trees are); False keeps the tree's own key order.
  """
  if unbox:
    tree = meta.unbox(tree)
  if hasattr(tree, "unfreeze"):
    tree = tree.unfreeze()
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def unflatten(flat: dict[str, Any]) -> dict:
  """{'/'-joined path: leaf} -> the nested dict (the inverse of `flatten`)."""
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def compile_regexes(patterns: str | Iterable[str] | None, where: str) -> list[re.Pattern]:
  """A regex or regexes (None: none) compiled; a bad one raises ValueError naming `where`, its config key."""
  pats = () if patterns is None else (patterns,) if isinstance(patterns, str) else tuple(patterns)
  out = []
  for p in pats:
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"{where}: bad regex {p!r}: {e}") from None
  return out


def matches(path: str, regexes: Sequence[re.Pattern]) -> bool:
  """Whether any of the compiled `regexes` fullmatches `path`."""
  return any(r.fullmatch(path) for r in regexes)
