"""config.peft: parsing and validation (PeftConfig), the placeholder block of the base configs, and the
parameter names and path regexes of the PEFT leaves (what a PEFT config trains)."""

import dataclasses
import re
from typing import Any

from vlm.tree import compile_regexes

LORA_PARAMS = ("lora_a", "lora_b")
LORA_SET_PARAMS = ("lora_sets_a", "lora_sets_b")  # per-example LoRA sets (vlm.models.monkey.lora_sets)
ADAPTER_NAME = "adapter"
LORA_TRAINABLE = r"(.*/)?lora_(a|b)"
ADAPTER_TRAINABLE = r"(.*/)?adapter/.*"
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


def compile_patterns(value: Any, key: str) -> list[re.Pattern]:
  """config.peft.<key> (a regex, a list of regexes or None) compiled; a non-string or bad regex raises
  ValueError naming its config key."""
  pats = () if value is None else (value,) if isinstance(value, str) else tuple(value)
  for p in pats:
    if not isinstance(p, str):
      raise ValueError(f"config.peft.{key}: expected regex strings, got {p!r}")
  return compile_regexes(pats, f"config.peft.{key}")


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """A validated, hashable config.peft (see the vlm.peft docstring for the keys)."""

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
      kw[key] = tuple(r.pattern for r in compile_patterns(d[key], key))
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


def is_peft_path(path: str) -> bool:
  """Whether a parameter path is a PEFT parameter (LoRA, LoRA sets or adapters): such parameters are
  not in a base checkpoint, so loading one leaves them at their init."""
  return bool(
    re.fullmatch(LORA_TRAINABLE, path)
    or re.fullmatch(ADAPTER_TRAINABLE, path)
    or path.rsplit("/", 1)[-1] in LORA_SET_PARAMS
  )
