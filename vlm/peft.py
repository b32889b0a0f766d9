"""Parameter-efficient fine-tuning for every model: LoRA (Hu et al. 2021) and bottleneck adapters
(Houlsby et al. 2019), added from outside the model code through `flax.linen.intercept_methods`.

Config (a top-level trainer key, `config.peft`; None or absent: full fine-tuning):

    config.peft = dict(
        method='lora',          # 'lora' | 'adapter' | 'lora+adapter' (or a list of them)
        rank=8, alpha=16.0,     # LoRA rank r and scale alpha (the update is alpha / r * x A B)
        targets=[r'.*attn/(query|value)'],  # regexes, fullmatch on linear layers' module paths
        dropout=0.0,            # LoRA dropout on the layer input (training only)
        adapter_dim=64,         # adapter bottleneck width
        adapter_targets=[r'.*(block_\\d+|layers)'],  # regexes on block module paths
        train_also=[],          # extra parameter-path regexes to train, e.g. [r'connector/.*']
        save_only_peft=False,   # also write <workdir>/peft_params/ (trainable leaves only) at the end
    )

How it works. `build_model(name, model_cfg, peft=config.peft)` returns a subclass of the model
class (same name, same fields, same methods) whose `init` / `apply` run inside an interceptor:

  - LoRA: after a matching linear layer (`nn.Dense`, `nn.DenseGeneral`, `vlm.nn.attention.HeadsDense`)
    computes y = x W (+ b), the interceptor creates two parameters on that same module,
    `lora_a` [in, r] (kaiming-uniform, as loralib / HF PEFT) and `lora_b` [r, out] (zeros), and
    returns y + alpha / r * reshape(dropout(x_flat) A B). They sit beside `kernel` in the params
    tree (e.g. `txt/encoder/block_0/attn/query/lora_a`), carry the kernel's logical axis names
    (in-axis of A, out-axis of B) and get a leading 'layers' axis under nn.scan like every
    other parameter. B = 0, so the initial model is exactly the base model.
  - Adapters: after a matching block module returns y (for a tuple, its first element), the
    interceptor runs a child module `adapter` of that block: y + up(gelu(down(LN(y)))), `up`
    zero-initialised (identity at init); params `<block>/adapter/{norm,down,up}/...`.

Objectives, evaluations and predict code need no change: `model.apply(..., method=Cls.encode_image)`
and `type(model)` work as before. Creating params inside an interceptor is legal because flax
runs interceptors inside the intercepted method's compact scope; it works under nn.scan and
nn.remat (tested). `model.bind(...)` is not intercepted: use init/apply.

Only PEFT parameters (plus `train_also`) are trained: `vlm.optim.build_optimizer` reads
`config.peft` and freezes every other parameter (no optimiser state). For export,
`merge_lora` folds W + alpha / r * A B into the kernels; `python -m vlm.peft merge --workdir=DIR
--out=DIR2` writes a plain checkpoint (and config.json without `peft`) that the plain model
loads with `checkpoint.load_params(DIR2)` / `vlm.evaluate --workdir=DIR2`.
"""

import dataclasses
import functools
import inspect
import json
import math
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vlm.nn.attention import HeadsDense

LORA_PARAMS = ("lora_a", "lora_b")
LORA_SET_PARAMS = ("lora_sets_a", "lora_sets_b")  # per-example LoRA sets (lora_sets; Monkey)
ADAPTER_NAME = "adapter"
LORA_TRAINABLE = r"(.*/)?lora_(a|b)"
ADAPTER_TRAINABLE = r"(.*/)?adapter/.*"
LINEAR_TYPES = (nn.Dense, nn.DenseGeneral, HeadsDense)
_KEYS = (
  "method",
  "rank",
  "alpha",
  "targets",
  "dropout",
  "adapter_dim",
  "adapter_targets",
  "train_also",
  "save_only_peft",
)


# ------------------------------------------------------------------------------------------- config


def _patterns(value: Any, key: str) -> tuple[str, ...]:
  """A regex or list of regexes -> tuple, each compiled once to report a bad one by its config key."""
  if value is None:
    return ()
  pats = (value,) if isinstance(value, str) else tuple(value)
  for p in pats:
    if not isinstance(p, str):
      raise ValueError(f"config.peft.{key}: expected regex strings, got {p!r}")
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"config.peft.{key}: bad regex {p!r}: {e}") from None
  return pats


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """A validated, hashable config.peft (see the module docstring for the keys)."""

  method: tuple[str, ...] = ("lora",)
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = (r".*attn/(query|value)",)
  dropout: float = 0.0
  adapter_dim: int = 64
  adapter_targets: tuple[str, ...] = (r".*(block_\d+|layers)",)
  train_also: tuple[str, ...] = ()
  save_only_peft: bool = False

  @property
  def lora(self) -> bool:
    return "lora" in self.method

  @property
  def adapter(self) -> bool:
    return "adapter" in self.method

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def parse_config(peft: Any) -> PeftConfig | None:
  """config.peft (ConfigDict, dict, PeftConfig or None) -> PeftConfig, or None for no PEFT."""
  if peft is None or isinstance(peft, PeftConfig):
    return peft
  d = peft.to_dict() if hasattr(peft, "to_dict") else dict(peft)
  if not d:
    return None
  unknown = sorted(set(d) - set(_KEYS))
  if unknown:
    raise ValueError(f"config.peft: unknown keys {unknown}; known: {list(_KEYS)}")
  kw: dict[str, Any] = {}
  method = d.get("method", "lora")
  if method in (None, "", "none"):  # a placeholder block (see default_config): PEFT off
    return None
  methods = tuple(method.replace("both", "lora+adapter").split("+")) if isinstance(method, str) else tuple(method)
  if not methods or any(m not in ("lora", "adapter") for m in methods):
    raise ValueError(f"config.peft.method: {method!r}; expected 'lora', 'adapter' or 'lora+adapter'")
  kw["method"] = tuple(sorted(set(methods)))
  for key in ("targets", "adapter_targets", "train_also"):
    if key in d:
      kw[key] = _patterns(d[key], key)
  for key, typ in (("rank", int), ("adapter_dim", int), ("alpha", float), ("dropout", float)):
    if key in d:
      kw[key] = typ(d[key])
  if "save_only_peft" in d:
    kw["save_only_peft"] = bool(d["save_only_peft"])
  cfg = PeftConfig(**kw)
  if cfg.rank <= 0 or cfg.adapter_dim <= 0:
    raise ValueError(f"config.peft: rank ({cfg.rank}) and adapter_dim ({cfg.adapter_dim}) must be positive")
  if not 0.0 <= cfg.dropout < 1.0:
    raise ValueError(f"config.peft.dropout must be in [0, 1), got {cfg.dropout}")
  if cfg.lora and not cfg.targets:
    raise ValueError("config.peft.targets: LoRA needs at least one target regex")
  if cfg.adapter and not cfg.adapter_targets:
    raise ValueError("config.peft.adapter_targets: adapters need at least one target regex")
  return cfg


def default_config():
  """A `config.peft` block with PEFT off (method=''), for a base config: then the command line turns
  it on, e.g. `--config.peft.method=lora --config.peft.rank=4 --config.peft.targets="('.*attn/query',)"`
  (a locked config accepts overrides of existing keys only; tuples, not lists, can be overridden)."""
  import ml_collections

  d = dataclasses.asdict(PeftConfig())
  d["method"] = ""
  return ml_collections.ConfigDict(d)


def trainable_regexes(peft: Any) -> list[str]:
  """Parameter-path regexes that a PEFT config trains: its LoRA / adapter leaves and train_also."""
  cfg = parse_config(peft)
  if cfg is None:
    return []
  return ([LORA_TRAINABLE] if cfg.lora else []) + ([ADAPTER_TRAINABLE] if cfg.adapter else []) + list(cfg.train_also)


# ------------------------------------------------------------------------------------------- modules


class Adapter(nn.Module):
  """Houlsby bottleneck adapter on a block output: y + up(gelu(down(LN(y)))), up = 0 at init."""

  dim: int
  dtype: Any = None

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    d = y.shape[-1]
    h = nn.LayerNorm(
      epsilon=1e-6,
      dtype=self.dtype,
      name="norm",
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
    )(y)
    h = nn.Dense(
      self.dim,
      dtype=self.dtype,
      name="down",
      kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("embed", None)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
    )(h)
    h = nn.Dense(
      d,
      dtype=self.dtype,
      name="up",
      kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, (None, "embed")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )(nn.gelu(h))
    return y + h.astype(y.dtype)


# ------------------------------------------------------------------------------------------- interceptor


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


def _linear_geometry(m: nn.Module, x: jax.Array) -> tuple[tuple[int, ...], int]:
  """(contracted input axes of x, number of output feature axes) of a supported linear layer."""
  if isinstance(m, HeadsDense):
    return tuple(range(x.ndim - m.in_dims, x.ndim)), len(m.features)
  if isinstance(m, nn.DenseGeneral):
    if m.batch_dims:
      raise ValueError(
        f"config.peft.targets: {'/'.join(m.path)} is a DenseGeneral with batch_dims, which LoRA does not support"
      )
    axis = (m.axis,) if isinstance(m.axis, int) else tuple(m.axis)
    features = (m.features,) if isinstance(m.features, int) else tuple(m.features)
    return tuple(a % x.ndim for a in axis), len(features)
  return (x.ndim - 1,), 1


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


def _kernel_names(m: nn.Module, ndim: int) -> tuple | None:
  """Logical axis names of the module's kernel (only known at init, when it is still boxed)."""
  try:
    k = m.scope.get_variable("params", "kernel")
  except Exception:  # noqa: BLE001
    return None
  names = getattr(k, "names", None)
  return tuple(names) if names is not None and len(names) == ndim else None


def lora_update(
  m: nn.Module,
  y: jax.Array,
  x: jax.Array,
  *,
  rank: int,
  scale: float,
  names: tuple[str, str] = LORA_PARAMS,
  dropout_keep: float | None = None,
  num_sets: int = 0,
  set_index: jax.Array | None = None,
) -> jax.Array:
  """y + scale * x A B for the linear layer `m` that mapped x to y, creating A and B on `m`.

  A [in, r] (kaiming-uniform, as loralib / HF PEFT), B [r, out] (zeros: the update starts at 0);
  in/out are the layer's flattened contracted input and output feature axes. dropout_keep:
  LoRA dropout's keep probability (None: none; needs the 'dropout' rng).

  num_sets = S > 0: S independent LoRA sets, A [S, in, r] and B [S, r, out], and set_index [N]
  int picks one per example of the leading batch axis (-1: no update for that example). Monkey
  (Li et al. 2024, sec. 3.1) gives each window position its own set on one shared encoder: all
  views run as one batch, each with its own LoRA.
  """
  in_axes, n_out = _linear_geometry(m, x)
  k = len(in_axes)
  trailing = tuple(range(x.ndim - k, x.ndim))
  if in_axes != trailing:
    x = jnp.moveaxis(x, in_axes, trailing)
  in_shape, out_shape = x.shape[x.ndim - k :], y.shape[y.ndim - n_out :]
  n_in, n_out_flat = math.prod(in_shape), math.prod(out_shape)
  kernel_names = _kernel_names(m, k + n_out) if m.is_initializing() else None
  lead = ((None,), (num_sets,)) if num_sets else ((), ())
  a_names = lead[0] + (kernel_names[0] if kernel_names else None, None)
  b_names = lead[0] + (None, kernel_names[k] if kernel_names else None)
  param_dtype = getattr(m, "param_dtype", jnp.float32)
  a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # U(+-1/sqrt(fan_in))
  a = m.param(names[0], nn.with_logical_partitioning(a_init, a_names), lead[1] + (n_in, rank), param_dtype)
  b = m.param(
    names[1], nn.with_logical_partitioning(nn.initializers.zeros, b_names), lead[1] + (rank, n_out_flat), param_dtype
  )
  dtype = getattr(m, "dtype", None) or jnp.result_type(x)
  h = jnp.asarray(x, dtype).reshape(x.shape[: x.ndim - k] + (n_in,))
  if dropout_keep is not None:
    mask = jax.random.bernoulli(m.make_rng("dropout"), dropout_keep, h.shape)
    h = jnp.where(mask, h / dropout_keep, 0.0).astype(dtype)
  if num_sets:
    if set_index is None or set_index.shape != (h.shape[0],):
      raise ValueError(
        f"LoRA sets at {'/'.join(m.path)}: set_index must be [{h.shape[0]}] (one per example), "
        f"got {None if set_index is None else set_index.shape}"
      )
    idx = jnp.clip(set_index, 0, num_sets - 1)
    flat = h.reshape(h.shape[0], -1, n_in)
    u = jnp.einsum("bti,bir->btr", flat, jnp.asarray(a, dtype)[idx])
    u = jnp.einsum("btr,bro->bto", u, jnp.asarray(b, dtype)[idx])
    u = jnp.where((set_index >= 0)[:, None, None], u, 0.0)
    h = u.reshape(h.shape[:-1] + (n_out_flat,))
  else:
    h = (h @ jnp.asarray(a, dtype)) @ jnp.asarray(b, dtype)
  h = (h * jnp.asarray(scale, dtype)).reshape(h.shape[:-1] + tuple(out_shape))
  return y + h.astype(y.dtype)


def _lora(m: nn.Module, y: jax.Array, x: jax.Array, tracker: _Tracker) -> jax.Array:
  cfg = tracker.cfg
  train = cfg.dropout > 0.0 and tracker.train_stack and tracker.train_stack[-1]
  return lora_update(m, y, x, rank=cfg.rank, scale=cfg.scale, dropout_keep=1.0 - cfg.dropout if train else None)


def lora_sets(targets: Sequence[tuple[str, int]], num_sets: int, set_index: jax.Array, alpha: float | None = None):
  """A context (`with lora_sets(...): y = module(x)`, inside a compact method) adding per-example
  LoRA sets (lora_update with num_sets) to the targeted linear layers that run inside it.

  targets: (regex, rank) pairs; a layer is targeted when a regex fullmatches a trailing part of its
  module path (r'attn/(query|key|value|out)' matches 'img/encoder/block_0/attn/query'); the
  first matching pair decides the rank. alpha: the LoRA scale numerator (alpha / rank; None: alpha = rank, scale 1).
  Parameters `lora_sets_a`, `lora_sets_b` [num_sets, ...] sit on the targeted layers (apart from
  config.peft's `lora_a` / `lora_b`, which may be added on top). A regex that matches no
  layer raises when the context exits.
  """
  compiled = [(re.compile(p), int(r)) for p, r in targets]
  hits = {p.pattern: 0 for p, _ in compiled}
  seen: list[str] = []

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name != "__call__" or not isinstance(m, LINEAR_TYPES):
      return next_fun(*args, **kwargs)
    path = "/".join(m.path)
    seen.append(path)
    match = next(
      ((r, rank) for r, rank in compiled if any(r.fullmatch("/".join(m.path[i:])) for i in range(len(m.path)))), None
    )
    out = next_fun(*args, **kwargs)
    if match is None:
      return out
    r, rank = match
    hits[r.pattern] += 1
    x = args[0] if args else next(iter(kwargs.values()))
    scale = (alpha if alpha is not None else rank) / rank
    return lora_update(m, out, x, rank=rank, scale=scale, names=LORA_SET_PARAMS, num_sets=num_sets, set_index=set_index)

  class _Ctx:
    def __enter__(self):
      self._cm = nn.intercept_methods(interceptor)
      self._cm.__enter__()

    def __exit__(self, exc_type, exc, tb):
      self._cm.__exit__(exc_type, exc, tb)
      if exc_type is None:
        missing = [p for p, n in hits.items() if n == 0]
        if missing:
          raise ValueError(f"LoRA set targets {missing} match no linear layer; layers are e.g. {seen[:6]}")
      return False

  return _Ctx()


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


# ------------------------------------------------------------------------------------------- params


def _flat(params: Any) -> dict[str, Any]:
  params = nn.meta.unbox(params)
  if hasattr(params, "unfreeze"):
    params = params.unfreeze()
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def _unflat(flat: dict[str, Any]) -> dict:
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _matches(path: str, regexes: Sequence[re.Pattern]) -> bool:
  return any(r.fullmatch(path) for r in regexes)


def _compile(patterns: Sequence[str] | str | None, key: str) -> list[re.Pattern]:
  return [re.compile(p) for p in _patterns(patterns, key)]


def count_params(params: Any, trainable: Sequence[str] | None, frozen: Sequence[str] = ()) -> tuple[int, int]:
  """(trainable, total) parameter counts; trainable=None: all but `frozen` (regexes on paths)."""
  train_re = None if trainable is None else _compile(trainable, "trainable")
  frozen_re = _compile(frozen, "frozen")
  n_train = total = 0
  for path, v in _flat(params).items():
    n = int(np.prod(np.shape(v)))
    total += n
    if (train_re is None or _matches(path, train_re)) and not _matches(path, frozen_re):
      n_train += n
  return n_train, total


def is_peft_path(path: str) -> bool:
  """Whether a parameter path is a PEFT parameter (LoRA, LoRA sets or adapters): such parameters are
  not in a base checkpoint, so loading one leaves them at their init."""
  return bool(
    re.fullmatch(LORA_TRAINABLE, path)
    or re.fullmatch(ADAPTER_TRAINABLE, path)
    or path.rsplit("/", 1)[-1] in LORA_SET_PARAMS
  )


def peft_params(params: Any, regexes: Sequence[str] | None = None) -> dict:
  """The sub-tree of `params` whose paths match `regexes` (default: LoRA and adapter leaves)."""
  regs = _compile(regexes if regexes is not None else [LORA_TRAINABLE, ADAPTER_TRAINABLE], "trainable")
  return _unflat({p: v for p, v in _flat(params).items() if _matches(p, regs)})


def merge_lora(params: Any, alpha: float, rank: int | None = None) -> dict:
  """Folds LoRA into the base weights: kernel += alpha / r * (A @ B).reshape(kernel.shape).

  Returns the tree without `lora_a` / `lora_b` leaves (adapters, if any, are kept). Leading stacked
  axes (nn.scan's 'layers') are handled: A [..., in, r], B [..., r, out], kernel [..., *in, *out].
  rank: r (default: each A's last dimension; if given it must agree).
  """
  flat = _flat(params)
  out = {p: v for p, v in flat.items() if p.rsplit("/", 1)[-1] not in LORA_PARAMS}
  for path, a in flat.items():
    if not path.endswith("/lora_a") and path != "lora_a":
      continue
    prefix = path[: -len("lora_a")]
    b, kpath = flat.get(prefix + "lora_b"), prefix + "kernel"
    if b is None or kpath not in flat:
      raise ValueError(f"merge_lora: {path} has no {prefix}lora_b or {kpath}")
    r = a.shape[-1]
    if rank is not None and rank != r:
      raise ValueError(f"merge_lora: {path} has rank {r}, not {rank}")
    kernel = flat[kpath]
    xp = np if all(isinstance(t, np.ndarray) for t in (a, b, kernel)) else jnp
    delta = xp.einsum("...ir,...ro->...io", xp.asarray(a, np.float32), xp.asarray(b, np.float32))
    delta = delta.reshape(kernel.shape) * (alpha / r)
    out[kpath] = (xp.asarray(kernel, np.float32) + delta).astype(kernel.dtype)
  return _unflat(out)


# ------------------------------------------------------------------------------------------- files


def save_params(directory: str | Path, params: Any, step: int = 0) -> Path:
  """Writes `params` as a checkpoint that `vlm.checkpoint.load_params(directory)` reads back."""
  from vlm import checkpoint

  ckpt = checkpoint.Checkpointer(directory, save_every=1, keep=1, async_save=False)
  ckpt.save(int(step), {"params": params}, force=True)
  ckpt.close()
  return Path(directory)


def save_peft(directory: str | Path, params: Any, regexes: Sequence[str] | None = None, step: int = 0) -> Path:
  """Writes only the PEFT (trainable) leaves of `params` to `directory` (an orbax checkpoint)."""
  sub = peft_params(params, regexes)
  if not sub:
    raise ValueError("save_peft: no parameter matches the PEFT regexes")
  return save_params(directory, sub, step)


def load_peft(base_params: Any, peft_dir: str | Path, step: int | None = None) -> dict:
  """Base parameters (e.g. the plain pretrained checkpoint) + the leaves saved by save_peft.

  LoRA / adapter leaves are added; other saved leaves (train_also) replace base leaves of the same
  path and shape. Raises ValueError for a leaf that does not fit the base.
  """
  from vlm import checkpoint

  base = _flat(base_params)
  problems = []
  for path, v in _flat(checkpoint.load_params(peft_dir, step)).items():
    if path in base:
      if tuple(np.shape(base[path])) != tuple(np.shape(v)):
        problems.append(f"{path}: shape {tuple(np.shape(v))} != base {tuple(np.shape(base[path]))}")
    elif not is_peft_path(path):
      problems.append(f"{path}: not in the base parameters")
    elif path.endswith(LORA_PARAMS) and path.rsplit("/", 1)[0] + "/kernel" not in base:
      problems.append(f"{path}: the base has no {path.rsplit('/', 1)[0]}/kernel")
    base[path] = v
  if problems:
    raise ValueError(f"{peft_dir}: PEFT parameters do not fit the base:\n  " + "\n  ".join(problems))
  return _unflat(base)


def _latest_step(path: Path) -> int:
  import orbax.checkpoint as ocp

  ckpt_dir = path / "checkpoints" if (path / "checkpoints").exists() else path
  mngr = ocp.CheckpointManager(ckpt_dir.absolute(), options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step()
  mngr.close()
  return step or 0


def merge_workdir(workdir: str | Path, out: str | Path, step: int | None = None, alpha: float | None = None) -> Path:
  """Loads a PEFT run's parameters (latest or `step`), merges LoRA and writes a plain checkpoint
  (and config.json without `peft`) to `out`; adapters cannot be merged and raise."""
  from vlm import checkpoint

  workdir, out = Path(workdir), Path(out)
  config = None
  if (workdir / "config.json").exists():
    config = json.loads((workdir / "config.json").read_text())
  cfg = parse_config((config or {}).get("peft"))
  if alpha is None:
    if cfg is None:
      raise ValueError(f"{workdir}: no config.json with a `peft` block; pass --alpha")
    alpha = cfg.alpha
  params = checkpoint.load_params(workdir, step)
  adapters = [p for p in _flat(params) if re.fullmatch(ADAPTER_TRAINABLE, p)]
  if adapters:
    raise ValueError(
      f"{workdir}: adapters cannot be merged into the base weights (e.g. {adapters[0]}); "
      "serve this checkpoint with the PEFT model config"
    )
  if step is None:
    step = _latest_step(workdir)
  save_params(out, merge_lora(params, alpha), step)
  if config is not None:
    config.pop("peft", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
  return out


def main(argv) -> None:
  from absl import flags

  f = flags.FLAGS
  if len(argv) != 2 or argv[1] != "merge":
    raise SystemExit("usage: python -m vlm.peft merge --workdir=DIR --out=DIR2 [--step=N] [--alpha=A]")
  if not f.workdir or not f.out:
    raise SystemExit("merge needs --workdir and --out")
  out = merge_workdir(f.workdir, f.out, f.step, f.alpha)
  print(f"Wrote merged parameters to {out}", flush=True)


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("workdir", None, "Workdir (or checkpoints directory) of a PEFT training run.")
  flags.DEFINE_string("out", None, "Where to write the merged plain checkpoint.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_float("alpha", None, "LoRA alpha (default: the workdir's config.json peft.alpha).")
  app.run(main)
