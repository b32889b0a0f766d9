"""Test setup: 8 simulated CPU devices, set before JAX initialises."""

import getpass
import os
import tempfile

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is XLA compiling small programs (eager ops in init and unit tests cost
# ~70 ms each). The legacy elemental emitter at LLVM -O0 compiles 2x faster and the tiny test models
# run about as fast; numerics are the same to float32 rounding. Subprocesses (CLI tests) inherit it.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0")
# ...except the train step, the one program a training test runs hundreds of times: vlm.train compiles it
# with XLA's own defaults (fusion emitters, LLVM -O2) over the flags above. Measured on the Frozen learning
# test (200 steps, 2 cores): 74 -> 44 CPU-seconds, same metrics. Subprocesses inherit it.
os.environ.setdefault(
  "VLM_TRAIN_COMPILER_OPTIONS", '{"xla_cpu_use_fusion_emitters": true, "xla_backend_optimization_level": 2}'
)
# A compilation cache shared by the xdist workers, the CLI subprocesses and later runs: a program one
# test compiled is loaded by the next (the key covers the HLO, flags and jax version).
# VLM_TEST_COMPILATION_CACHE="" turns it off; another path moves it.
_CACHE = os.environ.get(
  "VLM_TEST_COMPILATION_CACHE", os.path.join(tempfile.gettempdir(), f"vlm-test-xla-cache-{getpass.getuser()}")
)
if _CACHE:
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))


import pytest  # noqa: E402

# Fixtures that train a model: a test asking for one (directly or through another fixture) belongs to
# the slow tier (`pytest -m "not slow"` leaves it out); tests that train by themselves are marked
# `@pytest.mark.slow` where they stand.
TRAINED_FIXTURES = {
  "siglip_workdir",
  "vlm_bed",
  "coca_run",
  "coca_workdir",
  "llava",
  "blip2_stage1",
  "stages",
  "grounding_workdir",
  "flava_run",
  "vlmo_chain_run",
}


# Under xdist (pytest.ini: --dist=loadgroup) the tests of one trained fixture run on one worker: a
# second worker asking for a run that is being built would wait on shared_run's lock, idle, for as long
# as the build takes. A fixture built on another (`stages` on `vlmo_chain_run`, `llava` on `vlm_bed`)
# groups its tests under the first of GROUP_FIRST it uses. The bed is the exception: its ~25 tests
# (each training its own VLM) are too much work for one worker, so they are not grouped; its two parts
# build on two workers at once (vlm_bed), so a worker reaching it waits at most for one part.
# tryfirst: xdist's own hook reads the groups.
GROUP_FIRST = ("vlmo_chain_run", "coca_run", "llava", "blip2_stage1")
UNGROUPED = {"vlm_bed"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  for item in items:
    used = TRAINED_FIXTURES & set(getattr(item, "fixturenames", ()))
    if used:
      item.add_marker(pytest.mark.slow)
      groups = used - UNGROUPED
      if groups:
        item.add_marker(pytest.mark.xdist_group(next((f for f in GROUP_FIRST if f in groups), min(groups))))


from helpers import TINY_DATA, TINY_LM, TINY_VISION, shrink, tiny_demo  # noqa: E402


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


def shared_run(tmp_path_factory, name: str, make) -> tuple:
  """(workdir, result) of `make(workdir)` (a training run returning its JSON-able metrics), computed
  once per test session, whichever xdist worker asks first: the others wait on a file lock and read
  the finished workdir. A run that fails leaves nothing behind, so the next asker retries and fails
  with its own traceback. Fixtures built with it must not ask for another shared_run (lock order)."""
  import json
  import shutil

  from filelock import FileLock

  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # shared by the workers of this session
  wd, done = root / f"shared_{name}", root / f"shared_{name}.json"
  with FileLock(str(root / f"shared_{name}.lock")):
    if not done.exists():
      shutil.rmtree(wd, ignore_errors=True)
      wd.mkdir()
      result = make(wd)
      done.write_text(json.dumps(result, default=float))
  return wd, json.loads(done.read_text())


@pytest.fixture(scope="session")
def siglip_workdir(tmp_path_factory, data_dir):
  """A 6-step tiny SigLIP run (helpers.tiny): the judge, scorer and init of other tests."""
  from configs import siglip_b16
  from helpers import tiny
  from vlm.train import train

  return shared_run(tmp_path_factory, "siglip", lambda wd: train(tiny(siglip_b16, data_dir, steps=6), wd))[0]


@pytest.fixture(scope="session")
def vlm_bed(tmp_path_factory, data_dir):
  """The "pretrained" parts of the VLM-on-an-LM tests, built once per session: <root>/clip, a CLIP demo
  whose image tower has helpers.TINY_VISION's sizes (150 steps at batch 64), and <root>/lm, the LM
  demo at helpers.TINY_LM's sizes (300 steps at batch 32 on the embedded text; 83% next-token
  accuracy, enough for a frozen LM to answer in the dataset's words). Returns <root> (links to the two
  shared runs). The parts are two shared_runs, asked for in opposite orders by even and odd xdist
  workers, so two workers that need the bed at the start build one part each."""
  from configs import clip_b16, lm_pretrain
  from vlm.train import train

  def clip(wd):
    c = shrink(clip_b16.get_config("demo"), data_dir, 150, batch_size=64)
    c.model.image.update(TINY_VISION)
    c.model.text.update(width=32, num_heads=2, mlp_dim=64, out_dim=32)
    c.evals = {}
    return train(c, wd)

  def lm(wd):
    c = shrink(lm_pretrain.get_config("demo"), data_dir, 300, batch_size=32)
    c.model.update(TINY_LM)
    return train(c, wd)

  parts = [("clip", clip), ("lm", lm)]
  if int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").lstrip("gw") or 0) % 2:
    parts.reverse()
  root = tmp_path_factory.mktemp("vlm_bed")
  for name, make in parts:
    (root / name).symlink_to(shared_run(tmp_path_factory, f"bed_{name}", make)[0], target_is_directory=True)
  return root


@pytest.fixture(scope="session")
def coca_run(tmp_path_factory, data_dir):
  """CoCa's lighter demo (helpers.tiny_demo at width 64, 150 steps, every evaluation at start and end):
  (workdir, final metrics). The learning, logging and predict tests and curation's captioner."""
  from vlm.train import train

  def make(wd):
    c = tiny_demo(data_dir, steps=150, width=64, depth=2, mlp_dim=128, num_heads=4)
    c.batch_size = 64
    for name in ("zeroshot", "retrieval", "captioning"):
      c.evals[name].max_examples = 256
    c.log_every = 10
    return train(c, wd)

  return shared_run(tmp_path_factory, "coca", make)


@pytest.fixture(scope="session")
def coca_workdir(coca_run):
  return coca_run[0]


# transformers 4.x's PretrainedConfig.__init__ defaults of the keys a config.json can carry at its top
# level (configuration_utils.py of 4.x; 5.x moved most of them to the model classes). 4.x's
# save_pretrained left a top-level key out when it equalled this default and the class's own.
V4_PRETRAINED_DEFAULTS = dict(
  return_dict=True,
  output_hidden_states=False,
  output_attentions=False,
  torchscript=False,
  torch_dtype=None,
  use_bfloat16=False,
  tf_legacy_loss=False,
  pruned_heads={},
  tie_word_embeddings=True,
  chunk_size_feed_forward=0,
  is_encoder_decoder=False,
  is_decoder=False,
  cross_attention_hidden_size=None,
  add_cross_attention=False,
  tie_encoder_decoder=False,
  architectures=None,
  finetuning_task=None,
  tokenizer_class=None,
  prefix=None,
  bos_token_id=None,
  pad_token_id=None,
  eos_token_id=None,
  sep_token_id=None,
  decoder_start_token_id=None,
  task_specific_params=None,
  problem_type=None,
  dtype=None,
  id2label={"0": "LABEL_0", "1": "LABEL_1"},
  label2id={"LABEL_0": 0, "LABEL_1": 1},
)
# 4.x text-config keys that 5.x folds into rope_parameters, with 4.x's class defaults.
_V4_ROPE_DEFAULTS = dict(rope_theta=10000.0, rope_scaling=None)


def _to_v4_rope(cfg: dict) -> dict:
  """5.x `rope_parameters` -> 4.x `rope_theta` (+ `rope_scaling` for scaled types, `partial_rotary_factor`)."""
  if not isinstance(cfg.get("rope_parameters"), dict):
    return cfg
  cfg = dict(cfg)
  rp = dict(cfg.pop("rope_parameters"))
  cfg["rope_theta"] = rp.pop("rope_theta", 10000.0)
  if "partial_rotary_factor" in rp:
    cfg["partial_rotary_factor"] = rp.pop("partial_rotary_factor")
  rtype = rp.pop("rope_type", "default")
  cfg["rope_scaling"] = None if rtype == "default" else dict(rp, rope_type=rtype)
  return cfg


def hub_style_config(config: dict) -> dict:
  """A config.json dict as transformers 4.x writes it (most checkpoints on the Hub): `rope_parameters`
  in 4.x's form (rope_theta / rope_scaling), every nested sub-config key equal to that sub-config
  class's default removed (model_type kept), and every top-level key equal to PretrainedConfig's 4.x
  default removed unless the model's config class has another default. The defaults come from the
  installed transformers classes, not from vlm's table."""
  from transformers import CONFIG_MAPPING

  def class_defaults(model_type):
    return _to_v4_rope(CONFIG_MAPPING[model_type]().to_dict()) if model_type in CONFIG_MAPPING else {}

  top = class_defaults(config["model_type"])
  out = {}
  for key, value in _to_v4_rope(config).items():
    if isinstance(value, dict) and "model_type" in value:  # a sub-config
      sub = _to_v4_rope(value)
      defaults = {**_V4_ROPE_DEFAULTS, **class_defaults(sub["model_type"])}
      kept = {k: v for k, v in sub.items() if k == "model_type" or k not in defaults or defaults[k] != v}
      kept.pop("transformers_version", None)
      out[key] = kept
    elif (
      key in V4_PRETRAINED_DEFAULTS and value == V4_PRETRAINED_DEFAULTS[key] and (key not in top or top[key] == value)
    ):
      continue
    else:
      out[key] = value
  return out


def save_hub_style(model, path) -> str:
  """model.save_pretrained(path) (safetensors), then config.json rewritten by hub_style_config."""
  import json
  import pathlib

  model.save_pretrained(str(path))
  file = pathlib.Path(path) / "config.json"
  file.write_text(json.dumps(hub_style_config(json.loads(file.read_text())), indent=2))
  return str(path)


def notebook_script(path) -> str:
  """The code cells of an .ipynb as one script; IPython-only lines (`!cmd`, `%magic`) become comments."""
  import json
  import pathlib

  nb = json.loads(pathlib.Path(path).read_text())
  chunks = []
  for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] != "code":
      continue
    src = "".join(cell["source"])
    src = "\n".join("# " + line if line.lstrip().startswith(("!", "%")) else line for line in src.splitlines())
    chunks.append(f"# --- cell {i} ---\n{src}\n")
  return "\n".join(chunks)


def write_tar(path, samples) -> None:
  """A webdataset-style tar at `path` with members (name, bytes) in order."""
  import io
  import tarfile

  with tarfile.open(path, "w") as tar:
    for name, data in samples:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
