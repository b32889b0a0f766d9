"""The trainer end to end: learning, metrics, resume after SIGKILL, fsdp vs one device, LiT, CLIs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import clip_b16, lit_b16, siglip_b16
from vlm import checkpoint
from vlm.metrics_writer import read_metrics
from vlm.train import train

from conftest import TINY_DATA
from helpers import tiny

ROOT = Path(__file__).resolve().parents[1]


def _cli_args(config_path: str, workdir, data_dir, steps: int, extra=()):
  sizes = [f"--config.data.builder.{k}={v}" for k, v in TINY_DATA.items()]
  return [
    sys.executable,
    "-m",
    "vlm.train",
    f"--config={config_path}",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    f"--config.total_steps={steps}",
    "--config.batch_size=16",
    "--config.log_every=1",
    "--config.model.image.width=32",
    "--config.model.image.depth=1",
    "--config.model.image.mlp_dim=64",
    "--config.model.image.num_heads=2",
    "--config.model.text.num_heads=2",
    "--config.schedule.warmup_steps=2",
    "--config.model.text.width=32",
    "--config.model.text.depth=1",
    "--config.model.text.mlp_dim=64",
    "--config.model.text.out_dim=32",
    "--config.evals.zeroshot.every=0",
    "--config.evals.retrieval.every=0",
    "--config.evals.zeroshot.max_examples=64",
    "--config.evals.retrieval.max_examples=64",
    "--config.tensorboard=False",
    *sizes,
    *extra,
  ]


def _env(devices: int):
  return dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


def test_metrics_jsonl_has_training_and_eval_rows(siglip_workdir):
  rows = read_metrics(siglip_workdir)
  steps = [r["step"] for r in rows if "train/loss" in r]
  assert steps == list(range(1, 7))
  last = [r for r in rows if "train/loss" in r][-1]
  for key in ("train/lr", "train/examples_per_s_per_device", "train/grad_norm", "train/scale", "train/bias"):
    assert key in last
  evals = [r for r in rows if "zeroshot/top1" in r]
  assert evals and evals[-1]["step"] == 6
  for key in ("zeroshot/top1_seen", "zeroshot/top1_unseen", "retrieval/i2t_r1", "retrieval/t2i_r10"):
    assert key in evals[-1]
  assert (siglip_workdir / "checkpoints" / "6").exists()


@pytest.mark.slow
@pytest.mark.parametrize("module", [siglip_b16, clip_b16], ids=["siglip", "clip"])
def test_demo_learns(module, data_dir, tmp_path):
  """A lighter version of the demo: zero-shot and retrieval well above chance after 150 steps."""
  c = tiny(module, data_dir, steps=150)
  c.model["image"].update(width=64, depth=2, mlp_dim=128, num_heads=4)
  c.model["text"].update(width=64, depth=1, mlp_dim=128, num_heads=4, out_dim=64)
  c.batch_size = 64
  c.evals.zeroshot.max_examples = 256
  c.evals.retrieval.max_examples = 256
  out = train(c, tmp_path)
  rows = [r for r in read_metrics(tmp_path) if "train/loss" in r]
  assert rows[-1]["train/loss"] < 0.8 * rows[0]["train/loss"]
  chance = out["zeroshot/chance"]
  assert out["zeroshot/top1_seen"] > 5 * chance, out
  assert out["retrieval/i2t_r5"] > 0.1, out


@pytest.mark.slow
def test_fsdp_on_8_devices_matches_one_device(data_dir, tmp_path):
  c = tiny(siglip_b16, data_dir, steps=4)
  c.mesh = [("data", 1), ("fsdp", 8), ("tensor", 1)]
  c.lr_mults = (("t", 10.0), ("b", 3.0))  # the CLI run below overrides the same (tuple-valued) key
  train(c, tmp_path / "fsdp")
  ref = subprocess.run(
    _cli_args(
      "configs/siglip_b16.py:demo", tmp_path / "one", data_dir, 4, ["--config.lr_mults=(('t', 10.0), ('b', 3.0))"]
    ),
    cwd=ROOT,
    env=_env(1),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert ref.returncode == 0, ref.stderr[-3000:]
  a = [r["train/loss"] for r in read_metrics(tmp_path / "fsdp") if "train/loss" in r]
  b = [r["train/loss"] for r in read_metrics(tmp_path / "one") if "train/loss" in r]
  np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted(data_dir, tmp_path):
  steps = 12
  extra = ["--config.checkpoint_every=3"]
  full = subprocess.run(
    _cli_args("configs/siglip_b16.py:demo", tmp_path / "full", data_dir, steps, extra),
    cwd=ROOT,
    env=_env(1),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert full.returncode == 0, full.stderr[-3000:]
  args = _cli_args("configs/siglip_b16.py:demo", tmp_path / "killed", data_dir, steps, extra)
  proc = subprocess.Popen(args, cwd=ROOT, env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = tmp_path / "killed" / "checkpoints"
  deadline = time.time() + 240
  try:
    while time.time() < deadline and not (ckpts / "6").exists():
      time.sleep(0.05)
    assert (ckpts / "6").exists(), "no checkpoint appeared"
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert not (ckpts / str(steps)).exists(), "the run finished before it was killed"
  resumed = subprocess.run(args, cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from" in resumed.stdout
  loss = lambda wd: [r for r in read_metrics(wd) if "train/loss" in r][-1]  # noqa: E731
  assert loss(tmp_path / "killed")["step"] == steps
  np.testing.assert_allclose(
    loss(tmp_path / "killed")["train/loss"], loss(tmp_path / "full")["train/loss"], rtol=1e-5, atol=1e-6
  )
  pa, pb = checkpoint.load_params(tmp_path / "killed"), checkpoint.load_params(tmp_path / "full")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), pa, pb)


def test_lit_keeps_the_loaded_image_tower(siglip_workdir, data_dir, tmp_path):
  c = tiny(lit_b16, data_dir, steps=4)
  c.init.path = str(siglip_workdir)
  train(c, tmp_path)
  before, after = checkpoint.load_params(siglip_workdir), checkpoint.load_params(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, before["img"], after["img"])
  assert not np.allclose(before["txt"]["head"]["kernel"], after["txt"]["head"]["kernel"])


def test_init_mismatch_lists_parameter_paths(siglip_workdir, data_dir, tmp_path):
  c = tiny(lit_b16, data_dir, steps=2)
  c.init.path = str(siglip_workdir)
  c.model["image"]["mlp_dim"] = 96  # no longer fits the checkpoint
  with pytest.raises(ValueError, match=r"img/encoder/block_0/mlp/fc1/kernel: shape \(32, 96\)"):
    train(c, tmp_path)


def test_init_resamples_the_position_embedding_for_a_new_resolution(siglip_workdir, data_dir, tmp_path):
  """A tower trained at 32 px initialises one at 64 px with init.resample_posemb (4x4 -> 8x8 grid)."""
  c = tiny(lit_b16, data_dir, steps=1)
  c.init.path = str(siglip_workdir)
  c.data.pp_train = c.data.pp_train.replace("resize(32)", "resize(64)")
  c.data.pp_eval = c.data.pp_eval.replace("resize(32)", "resize(64)")
  with pytest.raises(ValueError, match=r"img/pos_embedding/pos_embedding: shape \(1, 64, 32\) != checkpoint"):
    train(c, tmp_path / "plain")
  c.init.resample_posemb = True
  train(c, tmp_path / "resampled")
  before = checkpoint.load_params(siglip_workdir)["img"]["pos_embedding"]["pos_embedding"]
  after = checkpoint.load_params(tmp_path / "resampled")["img"]["pos_embedding"]["pos_embedding"]
  assert before.shape == (1, 16, 32) and after.shape == (1, 64, 32)
  np.testing.assert_allclose(after, checkpoint.resample_grid_posemb(before, 64), atol=1e-6)  # LiT: tower frozen
  # a class token's row stays in front and is not interpolated
  with_cls = np.concatenate([np.full((1, 1, 32), 7.0, np.float32), before], axis=1)
  out = checkpoint.resample_grid_posemb(with_cls, 65)
  np.testing.assert_array_equal(out[:, 0], with_cls[:, 0])
  np.testing.assert_allclose(out[:, 1:], checkpoint.resample_grid_posemb(before, 64), atol=1e-6)
  with pytest.raises(ValueError, match="class token"):
    checkpoint.resample_grid_posemb(with_cls, 64)


@pytest.mark.slow
def test_export_of_a_two_tower_run(data_dir, tmp_path):
  """vlm.export of a two_tower run (its registered exporter): a tiny sigmoid-loss run with SigLIP's
  last-token text pooling becomes a SiglipModel directory whose image embeddings are the run's; the
  demo's EOS-pooled text tower has no SigLIP equivalent, and the error names the field."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  from vlm.export import export
  from vlm.load import load_run
  from vlm.models import predict_fns

  c = tiny(siglip_b16, data_dir, steps=1, evals={})
  train(c, tmp_path / "eos")
  with pytest.raises(ValueError, match=r"model.text.pool_type='eos' has no siglip HF equivalent"):
    export(tmp_path / "eos", tmp_path / "eos_hf")
  c.model.text.pool_type = "last"
  train(c, tmp_path / "run")
  config = export(tmp_path / "run", tmp_path / "hf")
  assert config["model_type"] == "siglip" and config["architectures"] == ["SiglipModel"]
  hf = transformers.SiglipModel.from_pretrained(tmp_path / "hf").eval()
  _, model, _, params = load_run(tmp_path / "run")
  size = config["vision_config"]["image_size"]
  images = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  ours = np.asarray(predict_fns(model)["embed_image"](params, images))
  with torch.no_grad():
    theirs = hf.vision_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).pooler_output.numpy()
  theirs = theirs / np.linalg.norm(theirs, axis=-1, keepdims=True)
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.slow
def test_evaluate_and_predict_commands(siglip_workdir, data_dir, tmp_path):
  ev = subprocess.run(
    [sys.executable, "-m", "vlm.evaluate", f"--workdir={siglip_workdir}"],
    cwd=ROOT,
    env=_env(1),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert ev.returncode == 0, ev.stderr[-3000:]
  summary = json.loads(ev.stdout[ev.stdout.index("{") :])
  assert 0.0 <= summary["zeroshot/top1"] <= 1.0 and "retrieval/i2t_r1" in summary
  from PIL import Image

  img = tmp_path / "img.png"
  Image.new("RGB", (50, 40), (200, 20, 20)).save(img)
  pr = subprocess.run(
    [
      sys.executable,
      "-m",
      "vlm.predict",
      f"--workdir={siglip_workdir}",
      f"--image={img}",
      "--labels=red circle,blue star,green square",
    ],
    cwd=ROOT,
    env=_env(1),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert pr.returncode == 0, pr.stderr[-3000:]
  ranked = json.loads(pr.stdout[pr.stdout.index("[") :])
  assert sorted(r["label"] for r in ranked) == ["blue star", "green square", "red circle"]
  assert all(0.0 <= r["prob"] <= 1.0 for r in ranked)


def test_bad_config_names_the_key(data_dir, tmp_path):
  c = tiny(siglip_b16, data_dir)
  c.data.pp_train = "decode|flipp|value_range(-1, 1)"
  with pytest.raises(ValueError, match="flipp"):
    train(c, tmp_path)
  c = tiny(siglip_b16, data_dir)
  c.optimizer = "lamb"
  with pytest.raises(ValueError, match="config.optimizer"):
    train(c, tmp_path)


def test_the_train_step_compiles_with_the_process_default_options_under_the_configs(monkeypatch):
  """config.compiler_options over $VLM_TRAIN_COMPILER_OPTIONS (the suite's: the step at XLA -O2 while
  the rest of the process compiles at -O0); a bad value names the variable."""
  import ml_collections

  from vlm.train import COMPILER_OPTIONS_ENV, step_compiler_options

  c = siglip_b16.get_config("demo")
  assert json.loads(os.environ[COMPILER_OPTIONS_ENV]) == step_compiler_options(c)  # conftest's default
  monkeypatch.setenv(COMPILER_OPTIONS_ENV, '{"xla_backend_optimization_level": 2, "xla_cpu_enable_fast_math": false}')
  c.compiler_options = ml_collections.ConfigDict(dict(xla_backend_optimization_level=1))
  assert step_compiler_options(c) == {"xla_backend_optimization_level": 1, "xla_cpu_enable_fast_math": False}
  monkeypatch.setenv(COMPILER_OPTIONS_ENV, "")
  assert step_compiler_options(c) == {"xla_backend_optimization_level": 1}
  for bad in ("{nope", "[1]"):
    monkeypatch.setenv(COMPILER_OPTIONS_ENV, bad)
    with pytest.raises(ValueError, match=r"\$VLM_TRAIN_COMPILER_OPTIONS: not a JSON object"):
      step_compiler_options(c)
