"""The one trainer: `python -m vlm.train --config=configs/siglip_b16.py:demo --workdir=DIR`.

config -> mesh -> model (MODELS[model_name]) + objective (OBJECTIVES[objective_name]) + data
(grain pipeline) + evaluations (EVALS) -> jitted sharded train step -> orbax checkpoints,
metrics.jsonl, TensorBoard. Override any key with `--config.key=value`.

Config keys (besides `model`, `objective`, `data`, and the optimiser keys of vlm.optim):
  seed, batch_size (global), total_steps, mesh [(axis, size)], rules [(logical, mesh axes)],
  model_name, objective_name, accum_steps, log_every, checkpoint_every, keep_checkpoints,
  async_checkpoint, evals {name: {type, every, ...}}, eval_at_start (also evaluate the initial
  parameters, logged as step 0), init {path (orbax workdir/checkpoint or HF directory), mapping,
  step, hint: added to the error when path has no checkpoint}, or a dict of such named blocks
  applied in order (init.lm, init.vision),
  tensorboard, wandb {project, ...}, peak_flops_per_device (for MFU; known accelerators are looked up),
  attention_impl ('auto' | 'xla' | 'cudnn': jax.nn.dot_product_attention's implementation for every
  attention of the model and its evaluations; 'auto' = cuDNN on GPU where shapes and dtypes allow,
  vlm.nn.attention); the compute dtype is the model's `model.dtype` (e.g. 'bfloat16'; parameters,
  optimiser state and losses stay float32); input: data.prefetch batches are made ahead on a background
  thread and put on the devices ahead, data.worker_count grain processes (vlm.data.pipeline),
  coordinator_address / num_processes / process_id (multi-host; or pass them as flags),
  peft (LoRA / adapters, vlm.peft: only those parameters train; save_only_peft also writes
  <workdir>/peft_params/ with just the trainable leaves at the end).
"""

import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from vlm import checkpoint, parallel, peft
from vlm.data import check_config, make_pipeline
from vlm.evals import build_evals
from vlm.metrics_writer import MetricWriter
from vlm.models import build_model
from vlm.nn.attention import attention_implementation
from vlm.objectives import build_objective
from vlm.optim import build_optimizer, trainable_patterns
from vlm.train_step import create_train_state, make_train_step

# Dense bf16 peak FLOP/s per device, for the MFU estimate.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6e": 918e12,
              "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def peak_flops(config) -> float | None:
  if config.get("peak_flops_per_device"):
    return float(config.peak_flops_per_device)
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def _check(config) -> None:
  for key in ("model_name", "objective_name", "batch_size", "total_steps", "lr", "data"):
    if config.get(key) is None:
      raise ValueError(f"config.{key} is missing")
  check_config(config.data)


def _every(step: int, every: int | None, last: int) -> bool:
  return step == last or bool(every and step % every == 0)


def setup(config):
  """Mesh, model, objective, optimiser and evaluators from the config (no data, no state)."""
  mesh = parallel.make_mesh(config.get("mesh", [("data", -1)]))
  rules = tuple(tuple(r) for r in config.get("rules", parallel.DEFAULT_RULES))
  model = build_model(config.model_name, config.model, peft=config.get("peft"))
  objective = build_objective(config.objective_name, config.get("objective"), mesh=mesh)
  tx, schedule = build_optimizer(config, config.total_steps)
  evals = build_evals(config, model, mesh)
  return mesh, rules, model, objective, tx, schedule, evals


def init_blocks(config) -> list:
  """config.init as a list of blocks {path, mapping, step, hint}: one block, or a dict of named
  blocks (e.g. init.lm and init.vision for a VLM), applied in order; blocks without a path skipped."""
  init = config.get("init")
  if not init:
    return []
  if "path" in init:
    return [init] if init.path else []
  return [block for block in init.values() if block and block.get("path")]


def _load_init(block) -> dict:
  """The parameters of block.path (an orbax workdir or checkpoint, or an HF directory); block.hint
  (how to make them) joins the error if there are none."""
  try:
    return checkpoint.load_params(block.path, block.get("step"))
  except FileNotFoundError as e:
    if not block.get("hint"):
      raise
    raise FileNotFoundError(f"{e}. {block.hint}") from e


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains (or resumes) in `workdir`; returns the last logged metrics (incl. the final evaluations)."""
  _check(config)
  with attention_implementation(config.get("attention_impl")):
    return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  mesh, rules, model, objective, tx, schedule, evals = setup(config)
  total = int(config.total_steps)

  ckpt = checkpoint.Checkpointer(workdir, save_every=config.get("checkpoint_every", 1000),
                                 keep=config.get("keep_checkpoints", 3),
                                 async_save=config.get("async_checkpoint", True))
  start = ckpt.latest_step()
  loaded = []
  if start is None:  # before the data and the compiled init: a wrong path fails at once
    loaded = [(block, _load_init(block)) for block in init_blocks(config)]

  data_iter = make_pipeline(config.data, split="train", batch_size=config.batch_size, mesh=mesh, seed=config.seed)
  first = next(data_iter)
  state, shardings = create_train_state(model, tx, mesh, rules, objective.init_args(first), seed=config.seed)
  pending = None
  if start is not None:  # resume: state, RNG and the data iterator exactly where they were
    state, data_state = ckpt.restore(start, checkpoint.abstract_like(state))
    if data_state is not None:
      data_iter.set_state(data_state)
    print(f"Resumed from {ckpt.directory / str(start)}", flush=True)
  else:
    start, pending = 0, first
    for block, params in loaded:
      mapping = dict(block.mapping) if block.get("mapping") else None
      state = state.replace(params=checkpoint.merge_params(state.params, params, mapping,
                                                            resample_posemb=bool(block.get("resample_posemb"))))
      print(f"Initialised parameters from {block.path}", flush=True)

  trainable = trainable_patterns(config)
  if trainable is not None and jax.process_index() == 0:
    n_train, n_total = peft.count_params(state.params, [p for p, _ in trainable], list(config.get("frozen") or []))
    print(f"Trainable parameters: {n_train:,} of {n_total:,} ({100.0 * n_train / max(n_total, 1):.3f}%)", flush=True)

  step_fn = make_train_step(model, objective, tx, mesh, rules, shardings, accum_steps=config.get("accum_steps", 1))
  writer = MetricWriter(workdir, tensorboard=config.get("tensorboard", True), wandb=config.get("wandb"))
  n_dev = jax.device_count()
  flops = peak = None
  last: dict[str, Any] = {}
  log_every = config.get("log_every", 50)
  progress = _progress(start, total)

  def run_evals(step: int, due) -> bool:
    results = {}
    for name, evaluator in evals.items():
      if due(name):
        results.update(evaluator(state.params))
    if results:
      last.update(results)
      writer.write(step, results)
      progress.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(results.items())))
    return bool(results)

  if start == 0 and config.get("eval_at_start"):  # the untrained model's numbers, as step 0
    run_evals(0, lambda name: True)
  t0, steps_since = time.perf_counter(), 0
  for step in range(start + 1, total + 1):
    batch = pending if pending is not None else next(data_iter)
    pending = None
    if flops is None and jax.process_index() == 0:
      flops, peak = step_fn.flops(state, batch) or 0.0, peak_flops(config)
    state, metrics = step_fn(state, batch)
    steps_since += 1
    ckpt.save(step, state, data_state=data_iter.get_state(), force=step == total)
    if _every(step, log_every, total):
      metrics = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
      dt = (time.perf_counter() - t0) / steps_since
      metrics["train/lr"] = float(schedule(step - 1))
      metrics["train/examples_per_s_per_device"] = config.batch_size / dt / n_dev
      if flops:
        # XLA's cost analysis of the SPMD program counts one device's share: no division by n_dev.
        metrics["train/tflops_per_s_per_device"] = flops / dt / 1e12
        if peak:
          metrics["train/mfu"] = flops / dt / peak
      metrics.update({f"data/{k}": v for k, v in data_iter.stats().items() if k.startswith(("skipped", "packed"))})
      last.update(metrics)
      writer.write(step, metrics)
      progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", ex_s=f"{config.batch_size / dt:.0f}")
      t0, steps_since = time.perf_counter(), 0
    if run_evals(step, lambda name: _every(step, config.evals[name].get("every"), total)):
      t0, steps_since = time.perf_counter(), 0  # evaluation time is not training time
    progress.update(1)
  progress.close()
  data_iter.close()
  ckpt.close()
  peft_cfg = peft.parse_config(config.get("peft"))
  if peft_cfg is not None and peft_cfg.save_only_peft:  # every process: orbax saves are collective
    peft.save_peft(workdir / "peft_params", state.params, peft.trainable_regexes(peft_cfg), step=total)
  writer.close()
  return last


class _NoProgress:
  def set_postfix(self, **_):
    pass

  def write(self, s):
    print(s, flush=True)

  def update(self, _):
    pass

  def close(self):
    pass


def _progress(start: int, total: int):
  if jax.process_index() != 0:
    return _NoProgress()
  from tqdm import tqdm
  return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=2.0)


def main(argv) -> None:
  del argv
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every save and read at INFO
  f = flags.FLAGS
  parallel.maybe_initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
  final = train(f.config, f.workdir)
  if jax.process_index() == 0:
    print({k: round(v, 4) for k, v in sorted(final.items()) if isinstance(v, float)}, flush=True)


def define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/siglip_b16.py:demo.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard events go here.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  from absl import app
  define_flags()
  app.run(main)
