"""Test setup: 8 simulated CPU devices, set before JAX initialises."""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))


import pytest  # noqa: E402

# A small embedded dataset for trainer-level tests (built once per test process).
TINY_DATA = dict(num_train=1024, num_validation=64, num_test=256)


def rewrite_checkpoint(src, dst, rename=lambda k: k, drop=(), add=None, config=None) -> str:
  """Copies the single-file HF checkpoint src to dst with keys renamed / dropped / added and the
  config edited (importer error tests)."""
  import json
  import pathlib

  from safetensors.numpy import load_file, save_file
  dst = pathlib.Path(dst)
  dst.mkdir()
  tensors = {rename(k): v for k, v in load_file(f"{src}/model.safetensors").items() if k not in drop}
  tensors.update(add or {})
  save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
  cfg = json.load(open(f"{src}/config.json"))
  cfg.update(config or {})
  (dst / "config.json").write_text(json.dumps(cfg))
  return str(dst)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  from vlm.data import embedded
  embedded.build(str(d), **TINY_DATA)
  return d
