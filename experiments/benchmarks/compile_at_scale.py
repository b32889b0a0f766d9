r"""Compiled for a pod without a pod: the full recipes' train steps lowered and compiled for a simulated
mesh of many CPU devices, with abstract state and batch (jax.ShapeDtypeStruct; nothing allocated).

    python experiments/benchmarks/compile_at_scale.py [--devices 64] [--recipes siglip_b16_all_gather,...]
        [--override model.lm_config.depth=4] [--json /tmp/compile_at_scale.jsonl] [--loss_batch 32768]

For each recipe (a config as it is in configs/ + the overrides listed in RECIPES): vlm.train.setup(config)
(evaluations emptied) gives mesh, model, objective and optimiser; the batch is the pipeline's keys at the
config's shapes (`abstract_batch`) sharded over the data axes; the state is
vlm.train_step.abstract_train_state; `make_train_step(...).compiled(state, batch)` compiles it. Printed per
recipe: per-device argument / output / temp bytes of `memory_analysis()` (total = argument + output -
aliased (the donated state) + temp), XLA's FLOPs per device and per step (cost_analysis, per device on a
partitioned program; x devices for the step), compile time, and whether the total fits 80 GB (1e9 bytes).
cost_analysis counts a while loop's body once, so for models with scanned layer stacks the FLOPs come
from extra unrolled compiles at depths 1 and 2 (`unrolled_flops`; --unrolled_flops=0 skips them).

The contrastive loss alone (vlm.objectives.contrastive.contrastive_term, value and gradient, on abstract
L2-normalised embeddings [--loss_batch, --loss_dim] sharded over all devices) is compiled for the
all-gather and the ring implementation: their temp-bytes ratio is the loss-memory ratio at that scale
(the whole step's temp is dominated by the towers' activations).

XLA:CPU caveats: its memory_analysis is the CPU compiler's buffer assignment for one partition of the
SPMD program (no GPU/TPU-specific fusion, scheduling or rematerialisation passes, and CPU may keep bf16
ops in f32), so the bytes are an estimate of the accelerator's, not a measurement of it. It honours
remat only inside a scan (the `_scan_remat` recipes); unrolled, remat adds FLOPs but saves no memory.
Results and the commands of each row: BENCHMARKS.md, "Compiled at scale".
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--devices", type=int, default=64, help="simulated CPU devices (JAX_NUM_CPU_DEVICES)")
  p.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help=f"comma-separated, of {sorted(RECIPES)}")
  p.add_argument(
    "--override",
    action="append",
    default=[],
    help="key=value (a Python literal) applied to every recipe's config after its own overrides",
  )
  p.add_argument("--loss_batch", type=int, default=32_768, help="global batch of the loss-alone compile (0: skip)")
  p.add_argument("--loss_dim", type=int, default=768)
  p.add_argument("--json", default=None, help="append one JSON line per result to this file")
  p.add_argument(
    "--unrolled_flops",
    type=int,
    default=1,
    help="1: a scanned LM's FLOPs from unrolled compiles at depth 1 and 2 (see unrolled_flops)",
  )
  return p.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A config file (+ ':variant') and the overrides (dotted config keys -> values) it is compiled with."""

  config: str
  overrides: tuple[tuple[str, Any], ...] = ()


_FSDP_7B = (("mesh", [("fsdp", -1)]), ("model.lm_config.scan_layers", True), ("model.lm_config.remat_policy", "full"))
_REMAT_TOWERS = (("model.image.remat_policy", "full"), ("model.text.remat_policy", "full"))
_SCAN_REMAT_TOWERS = (("model.image.scan", True), ("model.text.scan", True)) + _REMAT_TOWERS
RECIPES: dict[str, Recipe] = {
  "siglip_b16_all_gather": Recipe("configs/siglip_b16.py", (("objective.impl", "all_gather"),)),
  "siglip_b16_ring": Recipe("configs/siglip_b16.py", (("objective.impl", "ring"),)),
  "coca_b16": Recipe("configs/coca_b16.py"),
  "llava15_7b_stage2": Recipe("configs/llava_stage2.py", _FSDP_7B),
  "blip2_stage2_7b": Recipe("configs/blip2_stage2.py", _FSDP_7B),
  # Not in the default set: with / without rematerialisation, for comparison. XLA:CPU honours remat
  # only inside a scan (unrolled, its scheduler moves the recomputation up beside the forward pass).
  "siglip_b16_ring_remat": Recipe("configs/siglip_b16.py", (("objective.impl", "ring"),) + _REMAT_TOWERS),
  "coca_b16_remat": Recipe("configs/coca_b16.py", _REMAT_TOWERS),
  "siglip_b16_all_gather_scan_remat": Recipe(
    "configs/siglip_b16.py", (("objective.impl", "all_gather"),) + _SCAN_REMAT_TOWERS
  ),
  "siglip_b16_ring_scan_remat": Recipe("configs/siglip_b16.py", (("objective.impl", "ring"),) + _SCAN_REMAT_TOWERS),
  "coca_b16_scan_remat": Recipe("configs/coca_b16.py", _SCAN_REMAT_TOWERS[:1] + _REMAT_TOWERS),  # no decoder scan
  "llava15_7b_stage2_noremat": Recipe("configs/llava_stage2.py", _FSDP_7B[:2]),
  # BLIP-2's captions are short (LAVIS: 32 text tokens after the 32 queries); the recipe inherits
  # LLaVA's 2048-token conversations.
  "blip2_stage2_7b_len128": Recipe("configs/blip2_stage2.py", _FSDP_7B + (("data.conversation.length", 128),)),
}
DEFAULT_RECIPES = ("siglip_b16_all_gather", "siglip_b16_ring", "coca_b16", "llava15_7b_stage2", "blip2_stage2_7b")
GB = 1e9
HBM_BYTES = 80 * GB


if __name__ == "__main__":  # the device count must be set before JAX initialises
  _ARGS = _parse_args()
  os.environ["JAX_NUM_CPU_DEVICES"] = str(_ARGS.devices)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(REPO))  # the repo root, for `configs`

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from vlm import parallel  # noqa: E402
from vlm.data import preprocess  # noqa: E402
from vlm.models import decode_variant  # noqa: E402
from vlm.nn.attention import attention_implementation  # noqa: E402
from vlm.objectives.contrastive import contrastive_term  # noqa: E402
from vlm.train import setup  # noqa: E402
from vlm.train_step import abstract_train_state, make_train_step  # noqa: E402


# ------------------------------------------------------------------ config --


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/x.py[:variant]' -> get_config(variant)."""
  path, _, variant = spec.partition(":")
  file = (Path(path) if Path(path).is_absolute() else REPO / path).resolve()
  if file.is_relative_to(REPO):  # configs/x.py -> the module configs.x
    module = importlib.import_module(".".join(file.relative_to(REPO).with_suffix("").parts))
  else:
    module_spec = importlib.util.spec_from_file_location(f"_compile_at_scale_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
  return module.get_config(variant or None)


def set_key(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """config.a.b.c = value for key 'a.b.c' (new leaf keys allowed)."""
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  with node.unlocked() if hasattr(node, "unlocked") else contextlib.nullcontext():
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
  key, sep, value = text.partition("=")
  if not sep:
    raise ValueError(f"--override {text!r}: expected key=value")
  try:
    return key.strip(), ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key.strip(), value  # a bare string


def build_config(recipe: Recipe, extra: tuple[tuple[str, Any], ...] = ()) -> ml_collections.ConfigDict:
  config = load_config(recipe.config)
  for key, value in recipe.overrides + tuple(extra):
    set_key(config, key, value)
  config.evals = ml_collections.ConfigDict()  # evaluations are not part of the step
  return config


def compute_dtype(config) -> str:
  """The model's compute dtype as the config states it (model.dtype, else a tower's), 'float32' if none."""
  model = config.model
  for block in (model, *(model.get(k) or {} for k in ("image", "text", "lm_config", "vision_config"))):
    if block and block.get("dtype"):
      return str(block.get("dtype"))
  return "float32"


# ------------------------------------------------------------------- batch --


def image_shape(data) -> tuple[int, ...]:
  """One example's image shape after data.pp_train (a 480 x 640 stand-in through the real ops)."""
  return preprocess.eval_images([np.zeros((480, 640, 3), np.uint8)], data.pp_train).shape[1:]


def batch_shapes(config, batch_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{key: (shape, dtype)} of a training batch of the config (as vlm.data.pipeline makes it): 'image'
  float32 [B, H, W, 3], 'text' int32 [B, data.text_length] and, with data.conversation, 'tokens',
  'loss_mask' [B, length] (+ 'instruction' [B, instruction_length])."""
  data = config.data
  if data.get("interleaved_images", 1) > 1 or (data.get("conversation") or {}).get("pack", 1) > 1:
    raise NotImplementedError("abstract batches of interleaved or packed data")
  shapes = {
    "image": ((batch_size, *image_shape(data)), jnp.float32),
    "text": ((batch_size, int(data.text_length)), jnp.int32),
  }
  conv = data.get("conversation")
  if conv:
    length = int(conv.get("length", 64))
    shapes["tokens"] = shapes["loss_mask"] = ((batch_size, length), jnp.int32)
    if int(conv.get("instruction_length", 0)):
      shapes["instruction"] = ((batch_size, int(conv.instruction_length)), jnp.int32)
  return shapes


def abstract_batch(config, mesh, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """batch_shapes as jax.ShapeDtypeStructs with the batch sharding (dim 0 over the data axes)."""
  return {
    k: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh, len(shape)))
    for k, (shape, dtype) in batch_shapes(config, batch_size).items()
  }


# ----------------------------------------------------------------- compile --


def memory_report(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  out = dict(
    argument_bytes=int(m.argument_size_in_bytes),
    output_bytes=int(m.output_size_in_bytes),
    alias_bytes=int(m.alias_size_in_bytes),
    temp_bytes=int(m.temp_size_in_bytes),
  )
  out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  return out


def flops_per_device(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def compile_config(config, name: str = "") -> dict[str, Any]:
  """Lowers and compiles config's train step on abstract state and batch; returns the report row."""
  t0 = time.perf_counter()
  mesh, rules, model, objective, tx, _, _ = setup(config)
  batch = abstract_batch(config, mesh, int(config.batch_size))
  init_args = jax.eval_shape(objective.init_args, batch)
  state, shardings = abstract_train_state(model, tx, mesh, rules, init_args, seed=config.get("seed", 0))
  step = make_train_step(model, objective, tx, mesh, rules, shardings, accum_steps=config.get("accum_steps", 1))
  t_setup = time.perf_counter() - t0
  with attention_implementation(config.get("attention_impl")):
    t0 = time.perf_counter()
    compiled = step.compiled(state, batch)
    t_compile = time.perf_counter() - t0
  flops = flops_per_device(compiled)
  row = dict(
    recipe=name,
    mesh={k: int(v) for k, v in mesh.shape.items()},
    devices=int(mesh.size),
    global_batch=int(config.batch_size),
    dtype=compute_dtype(config),
    params=count_params(state.params),
    **memory_report(compiled),
    flops_per_device=flops,
    flops_per_step=None if flops is None else flops * mesh.size,
    setup_s=round(t_setup, 1),
    compile_s=round(t_compile, 1),
  )
  row["fits_80gb"] = row["total_bytes"] <= HBM_BYTES
  return row


# Layer stacks that can run under nn.scan: (config.model block, its scan flag).
_STACKS = (("lm_config", "scan_layers"), ("image", "scan"), ("text", "scan"))


def scanned_stacks(config) -> list[tuple[str, str, int]]:
  """(block, flag, depth) of the model's scanned layer stacks with more than one layer."""
  out = []
  for block, flag in _STACKS:
    cfg = config.model.get(block)
    if cfg and cfg.get(flag):
      depth = int(cfg.get("depth") or decode_variant(cfg.get("variant")).get("depth", 1))
      if depth > 1:
        out.append((block, flag, depth))
  return out


def unrolled_flops(config) -> tuple[float | None, float]:
  """FLOPs per device of config's step with its scanned stacks unrolled. cost_analysis counts a while
  loop's body once, so a scanned stack's count holds one layer; here every stack is unrolled at depth 1,
  then each in turn at depth 2: f = f(1, .., 1) + sum_i (depth_i - 1) (f(.., 2_i, ..) - f(1, .., 1)),
  exact for identical layers. Returns (FLOPs, seconds the compiles took)."""
  t0, stacks = time.perf_counter(), scanned_stacks(config)

  def flops(depths):
    small = copy.deepcopy(config)
    for (block, flag, _), depth in zip(stacks, depths):
      small.model[block][flag] = False
      small.model[block]["depth"] = depth
    return compile_config(small)["flops_per_device"]

  base = flops([1] * len(stacks))
  total = base
  for i, (_, _, depth) in enumerate(stacks):
    one_more = flops([2 if j == i else 1 for j in range(len(stacks))])
    if None in (base, one_more):
      return None, time.perf_counter() - t0
    total += (depth - 1) * (one_more - base)
  return total, time.perf_counter() - t0


def compile_loss(mesh, impl: str, kind: str = "sigmoid", batch: int = 32_768, dim: int = 768) -> dict[str, Any]:
  """Value and gradient of the objective's contrastive loss alone on abstract embeddings [batch, dim]
  (float32) sharded over the mesh's data axes; returns the memory report and compile time."""
  emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=parallel.batch_sharding(mesh, 2))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=parallel.replicated(mesh))

  def loss(zimg, ztxt, scale, bias):
    return contrastive_term(zimg, ztxt, {"scale": scale, "bias": bias}, loss=kind, impl=impl, mesh=mesh)[0]

  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(emb, emb, scalar, scalar).compile()
  return dict(
    recipe=f"loss_alone_{kind}_{impl}",
    devices=int(mesh.size),
    global_batch=batch,
    dim=dim,
    **memory_report(compiled),
    flops_per_device=flops_per_device(compiled),
    compile_s=round(time.perf_counter() - t0, 1),
  )


# ------------------------------------------------------------------ report --


def _gb(x) -> str:
  return f"{x / GB:.2f}"


def _flops(x) -> str:
  return "n/a" if x is None else f"{x:.3g}"


def markdown_rows(rows: list[dict]) -> str:
  head = (
    "| Recipe | Mesh | Global batch | dtype | Params | Argument GB | Output GB | Temp GB | Total GB | "
    "FLOPs/step (per device) | Compile s | Fits 80 GB |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
  )
  lines = [head]
  for r in rows:
    mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
    lines.append(
      f"| {r['recipe']} | {mesh} | {r['global_batch']:,} | {r['dtype']} | {r['params'] / 1e9:.2f}B | "
      f"{_gb(r['argument_bytes'])} | {_gb(r['output_bytes'])} | {_gb(r['temp_bytes'])} | "
      f"{_gb(r['total_bytes'])} | {_flops(r['flops_per_step'])} ({_flops(r['flops_per_device'])})"
      f"{' *' if r.get('flops_note') else ''} | "
      f"{r['compile_s']:.0f} | {'yes' if r['fits_80gb'] else 'no'} |"
    )
  return "\n".join(lines)


def _emit(row: dict, path: str | None) -> None:
  print(json.dumps(row), flush=True)
  if path:
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")


def main(args: argparse.Namespace) -> None:
  print(f"{jax.device_count()} {jax.devices()[0].platform} devices; jax {jax.__version__}", flush=True)
  extra = tuple(parse_override(o) for o in args.override)
  rows = []
  for name in [r for r in args.recipes.split(",") if r]:
    if name not in RECIPES:
      raise SystemExit(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    recipe = RECIPES[name]
    config = build_config(recipe, extra)
    row = compile_config(config, name)
    if args.unrolled_flops and scanned_stacks(config):
      row["flops_per_device_scanned"] = row["flops_per_device"]
      row["flops_per_device"], row["flops_compile_s"] = unrolled_flops(config)
      row["flops_per_step"] = row["flops_per_device"] and row["flops_per_device"] * row["devices"]
      row["flops_note"] = "scanned stacks unrolled at depth 1 and 2, extrapolated"
    row["config"] = recipe.config
    row["overrides"] = {k: v for k, v in recipe.overrides + extra}
    rows.append(row)
    _emit(row, args.json)
  if rows:
    print(markdown_rows(rows), flush=True)
  by_name = {r["recipe"]: r for r in rows}
  if "siglip_b16_all_gather" in by_name and "siglip_b16_ring" in by_name:
    ag, ring = by_name["siglip_b16_all_gather"], by_name["siglip_b16_ring"]
    print(
      f"SigLIP whole step: temp all-gather {_gb(ag['temp_bytes'])} GB, ring {_gb(ring['temp_bytes'])} GB, "
      f"difference {_gb(ag['temp_bytes'] - ring['temp_bytes'])} GB",
      flush=True,
    )
  if args.loss_batch:
    mesh = parallel.make_mesh([("data", -1)])
    loss_rows = {
      impl: compile_loss(mesh, impl, "sigmoid", args.loss_batch, args.loss_dim) for impl in ("all_gather", "ring")
    }
    for row in loss_rows.values():
      _emit(row, args.json)
    ratio = loss_rows["all_gather"]["temp_bytes"] / max(loss_rows["ring"]["temp_bytes"], 1)
    print(
      f"Sigmoid loss alone, value and gradient, [{args.loss_batch}, {args.loss_dim}] over {mesh.size} devices: "
      f"temp all-gather {loss_rows['all_gather']['temp_bytes'] / 2**20:.1f} MiB, ring "
      f"{loss_rows['ring']['temp_bytes'] / 2**20:.2f} MiB: ratio {ratio:.1f}x",
      flush=True,
    )


if __name__ == "__main__":
  main(_ARGS)
