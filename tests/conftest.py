"""Test setup: 8 simulated CPU devices, set before JAX initialises."""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))


import pytest  # noqa: E402

# A small embedded dataset for trainer-level tests (built once per test process).
TINY_DATA = dict(num_train=1024, num_validation=64, num_test=256)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  from vlm.data import embedded
  embedded.build(str(d), **TINY_DATA)
  return d
