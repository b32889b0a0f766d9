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
checkpoint_every=0 and log_every=0 save / log only the last step; keep_checkpoints=None keeps all.

Reliability (README "Reliability"):
  - the config is checked before anything runs: every scalar trainer key, batch_size against
    accum_steps, the data-parallel devices and the processes, the objective's options, the model,
    evaluation and objective names; ValueError names the key and the value;
  - <workdir>/LOCK (vlm.workdir): process 0 holds it for the whole run, taken before anything is
    written; a second trainer on the same workdir fails at once naming the holder's host, pid and
    start time; the lock of a killed run is taken over with a message;
  - a resume checks the workdir before writing: the state shapes the config makes must be the
    checkpoint's, or ValueError lists the config keys that changed (dotted) and the parameter paths
    whose shapes differ. config.json stays the first start's; a resume with other (shape-preserving)
    keys records them as config.<step>.json;
  - metrics.jsonl is cut back to the rows of steps <= the resumed step (atomically), so replayed steps
    are logged once; evaluations due at the resumed step whose results are not in metrics.jsonl run
    first (a kill between the last checkpoint and the final evaluations loses no result);
  - a checkpoint save that fails on I/O raises one vlm.checkpoint.CheckpointWriteError with the path,
    the errno message and the free space; the earlier checkpoints stay.
"""

import contextlib
import json
import numbers
import os
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from vlm import checkpoint, parallel, peft
from vlm.data import check_config, make_pipeline
from vlm.evals import EVALS, build_evals
from vlm.metrics_writer import MetricWriter, read_metrics, truncate_metrics
from vlm.models import MODELS, build_model
from vlm.nn.attention import attention_implementation
from vlm.objectives import OBJECTIVES, build_objective
from vlm.optim import build_optimizer, trainable_patterns
from vlm.registry import to_kwargs
from vlm.train_step import abstract_train_state, create_train_state, make_train_step
from vlm.workdir import WorkdirLock, WorkdirLockedError, config_dict, config_diff, latest_config, record_config

# Dense bf16 peak FLOP/s per device, for the MFU estimate.
PEAK_FLOPS = {
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v6e": 918e12,
  "NVIDIA H100": 989e12,
  "NVIDIA H200": 989e12,
  "NVIDIA A100": 312e12,
}


def peak_flops(config) -> float | None:
  if config.get("peak_flops_per_device"):
    return float(config.peak_flops_per_device)
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def _int_key(config, key: str, minimum: int, default: Any = None, allow_none: bool = False) -> int | None:
  """config[key] as an int >= minimum (ValueError naming the key and the value otherwise)."""
  value = config.get(key, default)
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"config.{key}: must be an int >= {minimum}{' or None' if allow_none else ''}, got {value!r}")
  return int(value)


def _check(config) -> None:
  """Validates the trainer's config before anything is built, compiled or written: ValueError names the key."""
  for key in ("model_name", "objective_name", "batch_size", "total_steps", "lr", "data"):
    if config.get(key) is None:
      raise ValueError(f"config.{key} is missing")
  _int_key(config, "total_steps", 1)
  batch = _int_key(config, "batch_size", 1)
  accum = _int_key(config, "accum_steps", 1, default=1)
  _int_key(config, "log_every", 0, default=50)
  _int_key(config, "checkpoint_every", 0, default=1000)
  _int_key(config, "keep_checkpoints", 1, default=3, allow_none=True)
  _int_key(config, "seed", 0, default=0)
  lr = config.lr
  if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not np.isfinite(lr) or lr < 0:
    raise ValueError(f"config.lr: must be a finite number >= 0, got {lr!r}")
  if batch % accum:
    raise ValueError(f"config.batch_size={batch} is not divisible by config.accum_steps={accum}")
  mesh = parallel.make_mesh(config.get("mesh", [("data", -1)]))
  n_data = int(np.prod([mesh.shape[a] for a in parallel.data_axes(mesh)]))
  if batch % n_data:
    raise ValueError(
      f"config.batch_size={batch} is not divisible by the {n_data} data-parallel devices of "
      f"config.mesh={dict(mesh.shape)} (axes {parallel.data_axes(mesh)})"
    )
  if batch % jax.process_count():
    raise ValueError(f"config.batch_size={batch} is not divisible by the {jax.process_count()} processes")
  for key, registry in (("model_name", MODELS), ("objective_name", OBJECTIVES)):
    if config[key] not in registry:
      raise ValueError(f"config.{key}: unknown {registry.kind} {config[key]!r}; known: {registry.names()}")
  for name, cfg in (config.get("evals") or {}).items():
    kw = to_kwargs(cfg)
    if kw.get("type", name) not in EVALS:
      raise ValueError(f"config.evals.{name}.type: unknown evaluation {kw.get('type', name)!r}; known: {EVALS.names()}")
    every = kw.get("every")
    if every is not None and (isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 0):
      raise ValueError(f"config.evals.{name}.every: must be an int >= 0 or None, got {every!r}")
  build_objective(config.objective_name, config.get("objective"), mesh=mesh)  # its option checks; nothing compiles
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


def _agree(flags: list[bool]) -> list[bool]:
  """Process 0's flags, on every process (a multi-process run must take the same branches)."""
  if jax.process_count() == 1 or not flags:
    return flags
  from jax.experimental import multihost_utils

  return [bool(v) for v in np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(flags, np.int32)))]


@contextlib.contextmanager
def _workdir_lock(workdir: Path):
  """<workdir>/LOCK held by process 0 for the run (the other processes share its workdir and its fate)."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir).acquire()
    except WorkdirLockedError as e:
      error = e
  if not _agree([error is None])[0]:
    raise error if error is not None else WorkdirLockedError(f"process 0 could not lock {workdir / 'LOCK'}")
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


COMPILER_OPTIONS_ENV = "VLM_TRAIN_COMPILER_OPTIONS"


def step_compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """XLA options of the train step's compilation: the process default in $VLM_TRAIN_COMPILER_OPTIONS (a
  JSON object; tests/conftest.py sets it, beside XLA_FLAGS that compile the suite's many small programs
  fast at LLVM -O0, so that the one program a run repeats hundreds of times is optimised), then
  config.compiler_options over it."""
  raw = os.environ.get(COMPILER_OPTIONS_ENV, "")
  try:
    options = json.loads(raw) if raw.strip() else {}
  except json.JSONDecodeError as e:
    raise ValueError(f"${COMPILER_OPTIONS_ENV}: not a JSON object ({e}): {raw!r}") from None
  if not isinstance(options, dict):
    raise ValueError(f"${COMPILER_OPTIONS_ENV}: not a JSON object: {raw!r}")
  options.update(to_kwargs(config.get("compiler_options") or {}))
  return options


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains (or resumes) in `workdir`; returns the last logged metrics (incl. the final evaluations)."""
  _check(config)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with _workdir_lock(workdir), attention_implementation(config.get("attention_impl")):
    return _train(config, workdir)


def _check_resume(config, workdir: Path, ckpt: checkpoint.Checkpointer, step: int, abstract_state) -> None:
  """ValueError, before anything is written, when the config's state does not fit checkpoint `step`:
  the changed config keys (against the config in force, config.json or the newest config.<step>.json)
  and the state paths whose shapes differ."""
  problems = checkpoint.shape_mismatches(abstract_state, ckpt.saved_shapes(step))
  if not problems:
    return
  recorded = latest_config(workdir)
  if recorded is None:
    changed = "  (no config.json in the workdir to compare with)"
  else:
    diff = config_diff(recorded[1], config_dict(config))
    changed = "\n".join(f"  {k}: {_short(a)} -> {_short(b)}" for k, (a, b) in diff.items()) or "  (none)"
    changed = f"config keys changed since {recorded[0].name}:\n{changed}"
  shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
  raise ValueError(
    f"{workdir}: the config does not fit checkpoint {ckpt.directory / str(step)} it would resume from.\n"
    f"{changed}\nstate whose shapes differ:\n  "
    + "\n  ".join(shown)
    + "\nRevert those keys to resume, or train the new config in another --workdir."
  )


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def _missing_evals(rows: list[dict[str, Any]], names: list[str], step: int) -> list[str]:
  """The evaluations among `names` without a result row (a key '<name>/...') at `step` in metrics.jsonl."""
  keys = {k for r in rows if r.get("step") == step for k in r}
  return [n for n in names if not any(k.startswith(f"{n}/") for k in keys)]


def _train(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
  mesh, rules, model, objective, tx, schedule, evals = setup(config)
  total = int(config.total_steps)
  lead = jax.process_index() == 0

  ckpt = checkpoint.Checkpointer(
    workdir,
    save_every=config.get("checkpoint_every", 1000),
    keep=config.get("keep_checkpoints", 3),
    async_save=config.get("async_checkpoint", True),
  )
  start = ckpt.latest_step()
  loaded = []
  if start is None:  # before the data and the compiled init: a wrong path fails at once
    loaded = [(block, _load_init(block)) for block in init_blocks(config)]

  data_iter = make_pipeline(config.data, split="train", batch_size=config.batch_size, mesh=mesh, seed=config.seed)
  completed = False
  try:
    first = next(data_iter)
    init_args = objective.init_args(first)
    if start is not None:  # shapes from eval_shape: a changed model fails before any compile or write
      _check_resume(
        config, workdir, ckpt, start, abstract_train_state(model, tx, mesh, rules, init_args, seed=config.seed)[0]
      )
    state, shardings = create_train_state(model, tx, mesh, rules, init_args, seed=config.seed)
    pending = None
    if start is not None:  # resume: state, RNG and the data iterator exactly where they were
      state, data_state = ckpt.restore(start, checkpoint.abstract_like(state))
      if data_state is not None:
        data_iter.set_state(data_state)
      print(f"Resumed from {ckpt.directory / str(start)}", flush=True)
    else:
      pending = first
      for block, params in loaded:
        mapping = dict(block.mapping) if block.get("mapping") else None
        state = state.replace(
          params=checkpoint.merge_params(
            state.params, params, mapping, resample_posemb=bool(block.get("resample_posemb"))
          )
        )
        print(f"Initialised parameters from {block.path}", flush=True)
    resumed = start is not None
    start = start or 0

    # The workdir's record: the config (never over config.json once a checkpoint exists) and metrics.jsonl
    # cut back to the checkpoint (a fresh start keeps no row of an earlier, never checkpointed attempt).
    rows: list[dict[str, Any]] = []
    if lead:
      recorded = record_config(workdir, config, start if resumed else None)
      if recorded is not None and resumed:
        print(f"Config changed since the last start: recorded as {recorded}", flush=True)
      dropped = truncate_metrics(workdir, start if resumed else -1)
      if dropped:
        print(
          f"metrics.jsonl: dropped {dropped} rows after step {start if resumed else 0} "
          f"(written after the checkpoint the run {'resumes from' if resumed else 'restarts without'})",
          flush=True,
        )
      rows = read_metrics(workdir)

    trainable = trainable_patterns(config)
    if trainable is not None and lead:
      n_train, n_total = peft.count_params(state.params, [p for p, _ in trainable], list(config.get("frozen") or []))
      print(f"Trainable parameters: {n_train:,} of {n_total:,} ({100.0 * n_train / max(n_total, 1):.3f}%)", flush=True)

    step_fn = make_train_step(
      model,
      objective,
      tx,
      mesh,
      rules,
      shardings,
      accum_steps=config.get("accum_steps", 1),
      compiler_options=step_compiler_options(config),
    )
    writer = MetricWriter(
      workdir,
      tensorboard=config.get("tensorboard", True),
      wandb=config.get("wandb"),
      purge_step=start + 1 if resumed else None,
    )
    n_dev = jax.device_count()
    flops = peak = None
    last: dict[str, Any] = {}
    for row in rows:  # a run resumed at its end returns its result too
      last.update({k: v for k, v in row.items() if k != "step"})
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

    if not resumed and config.get("eval_at_start"):  # the untrained model's numbers, as step 0
      run_evals(0, lambda name: True)
    if resumed:  # evaluations due at the checkpoint's step that the killed run did not log
      due = [n for n in evals if _every(start, config.evals[n].get("every"), total)]
      absent = _missing_evals(rows, due, start)  # process 0's reading of metrics.jsonl decides for all
      missing = [n for n, f in zip(due, _agree([n in absent for n in due])) if f]
      if missing:
        progress.write(f"Evaluating {', '.join(missing)} at step {start}: no result in metrics.jsonl")
        run_evals(start, lambda name: name in missing)
    t0, steps_since = time.perf_counter(), 0
    for step in range(start + 1, total + 1):
      batch = pending if pending is not None else next(data_iter)
      pending = None
      if flops is None and lead:
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
    ckpt.close()
    completed = True
    peft_cfg = peft.parse_config(config.get("peft"))
    if peft_cfg is not None and peft_cfg.save_only_peft:  # every process: orbax saves are collective
      checkpoint.save_peft(workdir / "peft_params", state.params, peft.trainable_regexes(peft_cfg), step=total)
    writer.close()
    return last
  finally:
    data_iter.close()
    if not completed:  # an error: still finish an asynchronous save in flight (a checkpoint kept, not lost)
      with contextlib.suppress(Exception):
        ckpt.close()


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
