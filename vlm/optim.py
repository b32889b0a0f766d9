"""Optimisers from config: optax AdamW / Adafactor / SGD-momentum, schedules, clipping,
weight-decay masks, frozen parameters and learning-rate multipliers by regex on parameter paths.

Parameter paths are '/'-joined names (vlm.tree), e.g. 'img/encoder/block_3/attn/query/kernel'.
Config keys (all under the trainer config):
  optimizer: 'adamw' | 'adafactor' | 'sgd';  optimizer_kw: extra kwargs (adamw: b1, b2, eps;
      adafactor: decay_rate, eps, b1 momentum; sgd: momentum, nesterov)
  lr: peak learning rate;  schedule: dict(name='warmup_cosine'|'warmup_linear'|'warmup_rsqrt'|'constant',
      warmup_steps=..., end_lr_frac=0.0, timescale=..., cooldown_steps=...)
  wd: decoupled weight decay (scaled by the learning rate, as in AdamW);  wd_mask: regex of decayed
      paths (default: kernels and embeddings, i.e. not biases, norms, temperature and bias scalars)
  grad_clip_norm: clip by global norm (None: off)
  frozen: list of regexes; matching parameters get no update and no optimiser state
  trainable: list of regexes; parameters matching none of them are frozen (the complement of
      `frozen`; both may be given: frozen wins). Each regex must match some parameter.
  peft: a vlm.peft config implies trainable += its LoRA / adapter leaves and peft.train_also
  lr_mults: list of (regex, multiplier); the first match wins
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vlm import peft
from vlm.tree import compile_regexes, matches, path_str, tree_paths

DEFAULT_WD_MASK = r".*(kernel|embedding)$"


def make_schedule(
  lr: float,
  total_steps: int,
  name: str = "warmup_cosine",
  warmup_steps: int = 0,
  end_lr_frac: float = 0.0,
  timescale: int = 10_000,
  cooldown_steps: int = 0,
) -> optax.Schedule:
  """Learning-rate schedules. warmup_rsqrt: lr * sqrt(timescale / (step + timescale)) after warmup,
  with an optional linear cooldown to 0 over the last cooldown_steps (Zhai et al. 2022, "Scaling ViTs")."""
  warmup = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
  rest = max(total_steps - warmup_steps, 1)
  if name == "warmup_cosine":
    main = optax.cosine_decay_schedule(lr, rest, alpha=end_lr_frac)
  elif name == "warmup_linear":
    main = optax.linear_schedule(lr, lr * end_lr_frac, rest)
  elif name == "constant":
    main = optax.constant_schedule(lr)
  elif name == "warmup_rsqrt":

    def main(step):
      value = lr * jnp.sqrt(timescale / (step + timescale))
      if cooldown_steps:
        value = value * jnp.clip((rest - step) / cooldown_steps, 0.0, 1.0)
      return value
  else:
    raise ValueError(
      f"config.schedule.name: unknown schedule {name!r}; known: warmup_cosine, warmup_linear, warmup_rsqrt, constant"
    )
  if warmup_steps <= 0:
    return main
  return optax.join_schedules([warmup, main], [warmup_steps])


def _base(name: str, kw: dict[str, Any]) -> optax.GradientTransformation:
  if name == "adamw":
    return optax.scale_by_adam(b1=kw.get("b1", 0.9), b2=kw.get("b2", 0.999), eps=kw.get("eps", 1e-8))
  if name == "adafactor":
    rms = optax.scale_by_factored_rms(decay_rate=kw.get("decay_rate", 0.8), epsilon=kw.get("eps", 1e-30))
    if kw.get("b1"):  # first-moment momentum on the factored update (as CoCa's Adafactor with beta1 0.9)
      return optax.chain(rms, optax.ema(kw["b1"], debias=False))
    return rms
  if name == "sgd":
    return optax.trace(decay=kw.get("momentum", 0.9), nesterov=kw.get("nesterov", False))
  raise ValueError(f"config.optimizer: unknown optimizer {name!r}; known: adamw, adafactor, sgd")


def scale_by_regex(rules: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
  """Multiplies each update by the multiplier of the first regex that matches its path (else 1)."""
  compiled = [
    (r, float(m)) for r, m in zip(compile_regexes([r for r, _ in rules], "config.lr_mults"), [m for _, m in rules])
  ]

  def mult(path: str) -> float:
    return next((m for r, m in compiled if r.fullmatch(path)), 1.0)

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda p, u: u * mult(path_str(p)), updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def frozen_labels(frozen: Sequence[str], trainable: Sequence[tuple[str, str]] | None = None) -> Callable[[Any], Any]:
  """params -> a tree of 'train' / 'frozen' labels.

  trainable: None (everything not frozen trains) or (regex, config key) pairs; a parameter that
  matches none of them is frozen, and a regex that matches no parameter is an error naming its key.
  """
  regexes = compile_regexes(frozen, "config.frozen")
  train_re = None
  if trainable is not None:
    train_re = [(compile_regexes([p], f"config.{key}")[0], key) for p, key in trainable]

  def labels(params):
    paths = tree_paths(params)
    flat = jax.tree.leaves(paths)
    for i, r in enumerate(regexes):  # a typo would otherwise silently train what it meant to freeze
      if not any(r.fullmatch(p) for p in flat):
        raise ValueError(
          f"config.frozen[{i}]: {r.pattern!r} matches no parameter; parameters are e.g. {', '.join(flat[:8])}"
        )
    if train_re is not None:
      for r, key in train_re:
        if not any(r.fullmatch(p) for p in flat):
          hint = " (was the model built with build_model(..., peft=config.peft)?)" if key == "peft" else ""
          raise ValueError(
            f"config.{key}: {r.pattern!r} matches no parameter{hint}; parameters are e.g. {', '.join(flat[:8])}"
          )

    def label(p):
      if matches(p, regexes):
        return "frozen"
      if train_re is not None and not any(r.fullmatch(p) for r, _ in train_re):
        return "frozen"
      return "train"

    return jax.tree.map(label, paths)

  return labels


def trainable_patterns(config) -> list[tuple[str, str]] | None:
  """(regex, config key) pairs of config.trainable and the PEFT-implied ones; None if neither is set."""
  pats = [(p, "trainable") for p in (config.get("trainable") or [])]
  cfg = peft.parse_config(config.get("peft")) if config.get("peft") else None
  if cfg is not None:
    train_also = set(cfg.train_also)
    pats += [(p, "peft.train_also" if p in train_also else "peft") for p in peft.trainable_regexes(cfg)]
  return pats or None


def build_optimizer(config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(tx, schedule) from the trainer config (keys in the module docstring)."""
  sched_cfg = dict(config.get("schedule", {}) or {})
  sched = make_schedule(config.lr, total_steps, **sched_cfg)
  wd_re = compile_regexes([config.get("wd_mask", DEFAULT_WD_MASK)], "config.wd_mask")[0]
  chain = []
  if config.get("grad_clip_norm"):
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  chain.append(_base(config.get("optimizer", "adamw"), dict(config.get("optimizer_kw", {}) or {})))
  if config.get("wd", 0.0):
    chain.append(
      optax.add_decayed_weights(
        config.wd, mask=lambda params: jax.tree.map(lambda p: bool(wd_re.fullmatch(p)), tree_paths(params))
      )
    )
  chain.append(optax.scale_by_learning_rate(sched))
  if config.get("lr_mults"):
    chain.append(scale_by_regex([tuple(x) for x in config.lr_mults]))
  tx = optax.chain(*chain)
  trainable = trainable_patterns(config)
  if config.get("frozen") or trainable is not None:
    tx = optax.multi_transform(
      {"train": tx, "frozen": optax.set_to_zero()}, frozen_labels(list(config.get("frozen") or []), trainable)
    )
  return tx, sched
