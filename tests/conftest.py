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


# transformers 4.x's PretrainedConfig.__init__ defaults of the keys a config.json can carry at its top
# level (configuration_utils.py of 4.x; 5.x moved most of them to the model classes). 4.x's
# save_pretrained left a top-level key out when it equalled this default and the class's own.
V4_PRETRAINED_DEFAULTS = dict(
    return_dict=True, output_hidden_states=False, output_attentions=False, torchscript=False, torch_dtype=None,
    use_bfloat16=False, tf_legacy_loss=False, pruned_heads={}, tie_word_embeddings=True, chunk_size_feed_forward=0,
    is_encoder_decoder=False, is_decoder=False, cross_attention_hidden_size=None, add_cross_attention=False,
    tie_encoder_decoder=False, architectures=None, finetuning_task=None, tokenizer_class=None, prefix=None,
    bos_token_id=None, pad_token_id=None, eos_token_id=None, sep_token_id=None, decoder_start_token_id=None,
    task_specific_params=None, problem_type=None, dtype=None, id2label={"0": "LABEL_0", "1": "LABEL_1"},
    label2id={"LABEL_0": 0, "LABEL_1": 1})
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
    elif (key in V4_PRETRAINED_DEFAULTS and value == V4_PRETRAINED_DEFAULTS[key]
          and (key not in top or top[key] == value)):
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
