"""PEFT parameter trees: counting trainable parameters, picking the PEFT leaves, and folding LoRA
into the base kernels (merge_lora) for a plain model."""

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from vlm.peft.config import ADAPTER_TRAINABLE, LORA_PARAMS, LORA_TRAINABLE, compile_patterns
from vlm.tree import flatten, matches, unflatten


def count_params(params: Any, trainable: Sequence[str] | None, frozen: Sequence[str] = ()) -> tuple[int, int]:
  """(trainable, total) parameter counts; trainable=None: all but `frozen` (regexes on paths)."""
  train_re = None if trainable is None else compile_patterns(trainable, "trainable")
  frozen_re = compile_patterns(frozen, "frozen")
  n_train = total = 0
  for path, v in flatten(params).items():
    n = int(np.prod(np.shape(v)))
    total += n
    if (train_re is None or matches(path, train_re)) and not matches(path, frozen_re):
      n_train += n
  return n_train, total


def peft_params(params: Any, regexes: Sequence[str] | None = None) -> dict:
  """The sub-tree of `params` whose paths match `regexes` (default: LoRA and adapter leaves)."""
  regs = compile_patterns(regexes if regexes is not None else [LORA_TRAINABLE, ADAPTER_TRAINABLE], "trainable")
  return unflatten({p: v for p, v in flatten(params).items() if matches(p, regs)})


def merge_lora(params: Any, alpha: float, rank: int | None = None) -> dict:
  """Folds LoRA into the base weights: kernel += alpha / r * (A @ B).reshape(kernel.shape).

  Returns the tree without `lora_a` / `lora_b` leaves (adapters, if any, are kept). Leading stacked
  axes (nn.scan's 'layers') are handled: A [..., in, r], B [..., r, out], kernel [..., *in, *out].
  rank: r (default: each A's last dimension; if given it must agree).
  """
  flat = flatten(params)
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
  return unflatten(out)
