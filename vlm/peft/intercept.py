"""Adding PEFT to a model class from outside its code: a flax method interceptor, active during the
model's (outermost) init / apply, puts LoRA on the targeted linear layers and adapters after the
targeted blocks, and checks that every target regex matched something."""

import dataclasses
import functools
import inspect
import re
import threading
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from vlm.peft.config import ADAPTER_NAME, PeftConfig, parse_config
from vlm.peft.modules import LINEAR_TYPES, Adapter, lora_update


class _Tracker:
  """Per outermost init/apply: which regexes matched which modules, and the train-mode stack."""

  def __init__(self, cfg: PeftConfig):
    self.cfg = cfg
    self.lora_re = [re.compile(p) for p in cfg.targets] if cfg.lora else []
    self.adapter_re = [re.compile(p) for p in cfg.adapter_targets] if cfg.adapter else []
    self.lora_hits: dict[str, set] = {p.pattern: set() for p in self.lora_re}
    self.adapter_hits: dict[str, set] = {p.pattern: set() for p in self.adapter_re}
    self.linear_paths: dict[str, str] = {}  # every linear layer seen -> class name
    self.module_paths: dict[str, str] = {}
    self.train_stack: list[bool] = []


_local = threading.local()


def _active() -> "_Tracker | None":
  return getattr(_local, "tracker", None)


def _inside_adapter(m: nn.Module) -> bool:
  p = m
  while isinstance(p, nn.Module):
    if isinstance(p, Adapter):
      return True
    p = p.parent
  return False


@functools.lru_cache(maxsize=None)
def _signature(fn) -> inspect.Signature | None:
  try:
    return inspect.signature(fn)
  except (TypeError, ValueError):
    return None


def _train_flag(m: nn.Module, args, kwargs) -> bool | None:
  """Whether this call runs in training mode, from its `train` / `deterministic` argument if it has one."""
  sig = _signature(type(m).__call__)
  if sig is None or not ({"train", "deterministic"} & set(sig.parameters)):
    return None
  try:
    bound = sig.bind(m, *args, **kwargs)
  except TypeError:
    return None
  bound.apply_defaults()
  for name, flip in (("train", False), ("deterministic", True)):
    v = bound.arguments.get(name)
    if isinstance(v, (bool, np.bool_)):
      return bool(v) != flip
  return None


def _lora(m: nn.Module, y: jax.Array, x: jax.Array, tracker: _Tracker) -> jax.Array:
  cfg = tracker.cfg
  train = cfg.dropout > 0.0 and tracker.train_stack and tracker.train_stack[-1]
  return lora_update(m, y, x, rank=cfg.rank, scale=cfg.scale, dropout_keep=1.0 - cfg.dropout if train else None)


def _interceptor(next_fun, args, kwargs, context):
  tracker = _active()
  if tracker is None or context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  m = context.module
  if isinstance(m, Adapter) or _inside_adapter(m):
    return next_fun(*args, **kwargs)
  path = "/".join(m.path)
  pushed = False
  if tracker.cfg.lora and tracker.cfg.dropout > 0.0:
    flag = _train_flag(m, args, kwargs)
    if flag is not None:
      tracker.train_stack.append(flag)
      pushed = True
  try:
    tracker.module_paths.setdefault(path, type(m).__name__)
    lora_hit = []
    if isinstance(m, LINEAR_TYPES):
      tracker.linear_paths[path] = type(m).__name__
      lora_hit = [r.pattern for r in tracker.lora_re if r.fullmatch(path)]
    out = next_fun(*args, **kwargs)
    if lora_hit:
      for p in lora_hit:
        tracker.lora_hits[p].add(path)
      x = args[0] if args else next(iter(kwargs.values()))
      out = _lora(m, out, x, tracker)
    ad_hit = [r.pattern for r in tracker.adapter_re if r.fullmatch(path)]
    if ad_hit:
      if not m._state.in_compact_method:  # noqa: SLF001 (params can only be created in compact methods)
        raise ValueError(
          f"config.peft.adapter_targets: {path} ({type(m).__name__}) has no @nn.compact "
          "__call__, so an adapter cannot be attached to it; target its blocks instead"
        )
      for p in ad_hit:
        tracker.adapter_hits[p].add(path)
      adapter = Adapter(tracker.cfg.adapter_dim, dtype=getattr(m, "dtype", None), name=ADAPTER_NAME, parent=m)
      if isinstance(out, tuple):
        out = (adapter(out[0]),) + tuple(out[1:])
      else:
        out = adapter(out)
    return out
  finally:
    if pushed:
      tracker.train_stack.pop()


def _validate(tracker: _Tracker, model_name: str) -> None:
  """Raises ValueError for a target regex that matched no layer / module, listing what there is."""

  def sample(paths: Iterable[str]) -> str:
    paths = sorted(paths)
    more = f" ... ({len(paths)} in all)" if len(paths) > 12 else ""
    return ", ".join(paths[:12]) + more

  for pattern, hits in tracker.lora_hits.items():
    if not hits:
      raise ValueError(
        f"config.peft.targets: {pattern!r} matches no linear layer (nn.Dense, nn.DenseGeneral, HeadsDense) "
        f"of {model_name}; its linear layers are: {sample(tracker.linear_paths) or 'none'}"
      )
  for pattern, hits in tracker.adapter_hits.items():
    if not hits:
      blocks = [p for p in tracker.module_paths if re.search(r"(block_\d+|layers)$", p)]
      raise ValueError(
        f"config.peft.adapter_targets: {pattern!r} matches no module of {model_name}; "
        f"its blocks are: {sample(blocks or tracker.module_paths)}"
      )


class _Scope:
  """Activates the interceptor for one (outermost) init/apply; nested calls reuse it."""

  def __init__(self, cfg: PeftConfig, model_name: str, validate: bool):
    self.cfg, self.model_name, self.validate = cfg, model_name, validate
    self.owner = False

  def __enter__(self):
    if _active() is not None:
      return self
    self.owner = True
    _local.tracker = _Tracker(self.cfg)
    self._ctx = nn.intercept_methods(_interceptor)
    self._ctx.__enter__()
    return self

  def __exit__(self, exc_type, exc, tb):
    if not self.owner:
      return False
    tracker = _local.tracker
    try:
      self._ctx.__exit__(exc_type, exc, tb)
    finally:
      _local.tracker = None
    if exc_type is None and self.validate:
      _validate(tracker, self.model_name)
    return False


_CLASSES: dict[tuple[type, PeftConfig], type] = {}
_WRAPPED = ("init", "init_with_output", "apply", "lazy_init")


def peft_class(cls: type, peft: Any) -> type:
  """The PEFT version of a model class: same name, fields and methods; init/apply intercepted."""
  cfg = parse_config(peft)
  if cfg is None:
    return cls
  if getattr(cls, "peft_config", None) is not None:
    raise ValueError(f"{cls.__name__} already has PEFT ({cls.peft_config})")
  key = (cls, cfg)
  if key not in _CLASSES:

    def wrap(name):
      base = getattr(cls, name)

      @functools.wraps(base)
      def method(self, *args, **kwargs):
        # init checks that every target regex matched (not a partial init through `method=`).
        with _Scope(cfg, cls.__name__, validate=name != "apply" and kwargs.get("method") is None):
          return base(self, *args, **kwargs)

      return nn.nowrap(method)

    ns = {n: wrap(n) for n in _WRAPPED}
    ns.update(peft_config=cfg, __module__=cls.__module__, __qualname__=cls.__qualname__, __doc__=cls.__doc__)
    _CLASSES[key] = type(cls.__name__, (cls,), ns)
  return _CLASSES[key]


def with_peft(model: nn.Module, peft: Any) -> nn.Module:
  """An unbound model instance -> the same model with PEFT (see peft_class)."""
  cls = peft_class(type(model), peft)
  if cls is type(model):
    return model
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.init and f.name not in ("parent",)}
  return cls(**fields)
