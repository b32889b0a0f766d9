r"""Train-step throughput of any config, through vlm's own trainer pieces, optionally beside a peer.

    python experiments/benchmarks/bench_train.py --config=configs/siglip_b16.py \
        --config.batch_size=16 [--steps=10 --rounds=3 --data=fixed|pipeline --peer=hf]

The batch has the config's shapes: it comes from the config's own data pipeline (its pp ops, text
length, conversation) on the embedded dataset unless `--config.data.source` points elsewhere.
`--data=fixed` repeats one batch on the devices; `--data=pipeline` draws every step from the real
pipeline (prefetch and workers as the config says), the way vlm.train does.

Prints one JSON line per measured setting: steps/s, examples/s (and text tokens/s) per device, TFLOP/s per device
(XLA's cost analysis of the compiled step), MFU where the accelerator's peak is known
(vlm.train.PEAK_FLOPS), peak device memory (GPU/TPU `memory_stats`; on CPU the compiled step's
argument + temp bytes), and the compile time.

`--peer=hf` (two-tower configs: SigLIP and CLIP) builds transformers' SiglipModel / CLIPModel with
exactly the vlm model's architecture and weights (vlm.convert.export_hf), checks both give the same
loss on the batch, then times the peer's train step (forward with the loss, backward, AdamW) in the
same process, alternating rounds of `--steps` steps with vlm's, and prints the per-step ratio.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `configs`

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vlm.data import make_pipeline  # noqa: E402
from vlm.nn.attention import attention_implementation  # noqa: E402
from vlm.train import peak_flops, setup  # noqa: E402
from vlm.train_step import create_train_state, make_train_step  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/siglip_b16.py.", lock_config=False)
flags.DEFINE_integer("steps", 10, "Steps per timed round.")
flags.DEFINE_integer("rounds", 3, "Timed rounds (alternating with the peer's); the median is reported.")
flags.DEFINE_enum("data", "fixed", ["fixed", "pipeline"], "One batch repeated, or the real pipeline each step.")
flags.DEFINE_enum("peer", None, ["hf"], "Also time transformers' model at the same shapes (two-tower configs).")
FLAGS = flags.FLAGS


def _median(xs):
  return float(np.median(np.asarray(xs)))


def memory_figure(compiled) -> dict:
  """Peak bytes in use on the first device (accelerators), else the compiled step's own estimate."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return {"peak_device_bytes": int(stats["peak_bytes_in_use"])}
  m = compiled.memory_analysis() if compiled is not None else None
  if m is None:
    return {}
  return {"compiled_argument_bytes": int(m.argument_size_in_bytes), "compiled_temp_bytes": int(m.temp_size_in_bytes)}


class VlmStep:
  """vlm's jitted, sharded train step on the config's model, objective and optimiser."""

  def __init__(self, config):
    self.config = config
    self.mesh, rules, self.model, self.objective, tx, _, _ = setup(config)
    self.data = make_pipeline(
      config.data, split="train", batch_size=config.batch_size, mesh=self.mesh, seed=config.seed
    )
    self.batch = next(self.data)
    self.state, shardings = create_train_state(
      self.model, tx, self.mesh, rules, self.objective.init_args(self.batch), seed=config.seed
    )
    self.step_fn = make_train_step(
      self.model, self.objective, tx, self.mesh, rules, shardings, accum_steps=config.get("accum_steps", 1)
    )
    t0 = time.perf_counter()
    self.flops = self.step_fn.flops(self.state, self.batch)  # compiles
    self.compile_s = time.perf_counter() - t0
    self.compiled = self.step_fn.compiled(self.state, self.batch)
    self.run(1)  # the first execution (allocations) is not timed

  def next_batch(self):
    return self.batch if FLAGS.data == "fixed" else next(self.data)

  def run(self, n: int) -> float:
    """Seconds per step over n steps (dispatched back to back, synchronised at the end)."""
    t0 = time.perf_counter()
    for _ in range(n):
      self.state, metrics = self.step_fn(self.state, self.next_batch())
    jax.block_until_ready((self.state, metrics))
    return (time.perf_counter() - t0) / n

  def loss(self) -> float:
    import jax.numpy as jnp

    with jax.set_mesh(self.mesh):
      out = self.objective(self.model, self.state.params, self.batch, rng=jax.random.key(0), train=False)
    return float(jnp.asarray(out[0]))


class HFPeer:
  """transformers' SiglipModel / CLIPModel with the vlm model's architecture and weights; AdamW."""

  def __init__(self, vlm: VlmStep):
    import torch
    import transformers

    from vlm.convert import export_hf

    config = vlm.config
    if config.model_name != "two_tower":
      raise app.UsageError(f"--peer=hf: needs a two-tower config (SigLIP / CLIP), got model_name={config.model_name}")
    self.kind = "siglip" if config.objective.get("loss") == "sigmoid" else "clip"
    params = jax.device_get(vlm.state.params)
    with tempfile.TemporaryDirectory() as d:
      export_hf(config.model.to_dict(), params, d, self.kind)
      cls = transformers.SiglipModel if self.kind == "siglip" else transformers.CLIPModel
      self.model = cls.from_pretrained(d, attn_implementation="sdpa").train()
    batch = jax.device_get(vlm.batch)
    self.pixels = torch.from_numpy(np.asarray(batch["image"], np.float32)).permute(0, 3, 1, 2).contiguous()
    self.ids = torch.from_numpy(np.asarray(batch["text"], np.int64))
    wd = float(config.get("wd", 0.0))
    self.opt = torch.optim.AdamW(
      self.model.parameters(),
      lr=float(config.lr),
      weight_decay=wd,
      betas=(config.optimizer_kw.b1, config.optimizer_kw.b2),
      eps=config.optimizer_kw.eps,
    )
    self.torch = torch

  def loss(self) -> float:
    with self.torch.no_grad():
      self.model.eval()
      out = self.model(input_ids=self.ids, pixel_values=self.pixels, return_loss=True)
      self.model.train()
    return float(out.loss)

  def run(self, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
      out = self.model(input_ids=self.ids, pixel_values=self.pixels, return_loss=True)
      out.loss.backward()
      self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / n


def main(argv) -> None:
  del argv
  config = FLAGS.config
  config.evals = {}
  n_dev = jax.device_count()
  device = jax.devices()[0]
  with attention_implementation(config.get("attention_impl")):
    vlm = VlmStep(config)
    peer = HFPeer(vlm) if FLAGS.peer else None
    losses = {}
    if peer is not None:
      losses = {"vlm_loss": vlm.loss(), "peer_loss": peer.loss()}
      peer.run(1)  # warm-up
    times, peer_times = [], []
    for _ in range(FLAGS.rounds):
      times.append(vlm.run(FLAGS.steps))
      if peer is not None:
        peer_times.append(peer.run(FLAGS.steps))
  dt = _median(times)
  peak = peak_flops(config)
  row = {
    "config": f"{config.model_name}/{config.objective_name}",
    "batch": config.batch_size,
    "dtype": str(config.model.get("dtype") or "float32"),
    "attention": config.get("attention_impl", "auto"),
    "data": FLAGS.data,
    "device": device.device_kind,
    "devices": n_dev,
    "threads": os.cpu_count(),
    "compile_s": round(vlm.compile_s, 2),
    "step_s": round(dt, 4),
    "steps_per_s": round(1 / dt, 3),
    "examples_per_s_per_device": round(config.batch_size / dt / n_dev, 2),
  }
  if "text" in vlm.batch:  # token positions per step (padding included): the LM recipes' throughput
    row["tokens_per_s_per_device"] = round(int(np.prod(vlm.batch["text"].shape)) / dt / n_dev, 1)
  if vlm.flops:
    # XLA's cost analysis counts one device's share of the SPMD program (and a scanned loop's body once:
    # with scan_layers the figure covers one layer; compile_at_scale.py corrects for that).
    row["tflops_per_s_per_device"] = round(vlm.flops / dt / 1e12, 4)
    if peak:
      row["mfu"] = round(vlm.flops / dt / peak, 4)
  row.update(memory_figure(vlm.compiled))
  if peer is not None:
    pdt = _median(peer_times)
    row.update(
      losses,
      peer=f"transformers {peer.kind}",
      peer_step_s=round(pdt, 4),
      peer_examples_per_s=round(config.batch_size / pdt, 2),
      speedup_vs_peer=round(pdt / dt, 3),
    )
  print(json.dumps(row), flush=True)
  vlm.data.close()  # stops the prefetch thread before exit (a daemon thread inside XLA aborts the interpreter)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
