"""vlm.convert.hf_config: the defaults table equals transformers' config classes, and configs written
the way transformers 4.x writes them (defaults left out) read back with those defaults."""

import json

import pytest

transformers = pytest.importorskip("transformers")

from conftest import hub_style_config  # noqa: E402
from vlm.convert import hf_config  # noqa: E402
from vlm.convert.hf_config import DERIVED, ConfigError, read_config  # noqa: E402


@pytest.mark.parametrize("model_type", sorted(hf_config.DEFAULTS))
def test_defaults_table_matches_transformers(model_type):
  """Every default in vlm's table is the one transformers' config class for that model_type has."""
  cls = transformers.CONFIG_MAPPING[model_type]
  assert cls.model_type == model_type
  ref = cls().to_dict()
  for key, ours in hf_config.DEFAULTS[model_type].items():
    assert key in ref, f"{model_type}.{key}: not a field of {cls.__name__}"
    if ours is DERIVED:
      continue
    assert ours == ref[key], f"{model_type}.{key}: vlm {ours!r}, transformers {ref[key]!r}"
  for key in hf_config._V4_DEFAULTS.get(model_type, {}):  # 4.x spellings folded into rope_parameters
    if key == "rope_theta":
      assert hf_config._V4_DEFAULTS[model_type][key] == ref["rope_parameters"]["rope_theta"]


@pytest.mark.parametrize("model_type", sorted(hf_config.SUB_CONFIGS))
def test_sub_config_types_match_transformers(model_type):
  """The sub-config each parent builds by default has the model_type vlm assumes when a file omits it."""
  ref = transformers.CONFIG_MAPPING[model_type]().to_dict()
  for key, sub_type in hf_config.SUB_CONFIGS[model_type].items():
    assert ref[key]["model_type"] == sub_type, (model_type, key)
    absent = hf_config.ABSENT_SUB_CONFIGS.get(model_type, {}).get(key)
    if absent:  # what the parent builds when the sub-config is absent
      for k, v in absent.items():
        assert ref[key][k] == v, (model_type, key, k)


@pytest.mark.parametrize(
  "kw",
  [dict(hidden_size=64, num_attention_heads=4), dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=None)],
)
def test_derived_defaults_as_transformers_computes_them(kw):
  cfg = hf_config.from_dict(dict(model_type="llama", **kw))
  ref = transformers.LlamaConfig(**kw)
  assert (cfg["head_dim"], cfg["num_key_value_heads"]) == (ref.head_dim, ref.num_key_value_heads)
  q = transformers.Qwen2Config(num_hidden_layers=3)
  assert hf_config.from_dict(dict(model_type="qwen2", num_hidden_layers=3))["layer_types"] == q.layer_types


@pytest.mark.parametrize(
  "model_type",
  ["clip", "siglip", "llava", "llava_next_video", "video_llava", "blip-2", "idefics", "fuyu", "chameleon", "flava"],
)
def test_hub_style_round_trip(model_type, tmp_path):
  """A config with non-default values, written in the 4.x style, reads back to every value of the full
  config (nested ones included): what from_pretrained would have."""
  cls = transformers.CONFIG_MAPPING[model_type]
  full = cls().to_dict()
  small = hub_style_config(full)
  assert len(json.dumps(small)) < len(json.dumps(full)) / 2  # the rewrite really leaves most keys out
  (tmp_path / "config.json").write_text(json.dumps(small))
  cfg = read_config(tmp_path)
  for sub, sub_type in hf_config.SUB_CONFIGS.get(model_type, {}).items():
    for key in hf_config.DEFAULTS[full[sub]["model_type"]]:
      if key in full[sub]:
        assert cfg[sub][key] == full[sub][key], (sub, key)


def test_missing_key_and_bad_value_name_the_file(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip", "text_config": {"hidden_act": "swish"}}))
  cfg = read_config(tmp_path)
  with pytest.raises(ConfigError, match=r"config.json: text_config.hidden_act = 'swish': not supported"):
    cfg["text_config"].choice("hidden_act", {"gelu": "gelu"})
  with pytest.raises(KeyError, match=r"text_config.no_such_key is absent"):
    cfg["text_config"]["no_such_key"]
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ConfigError, match=r"model_type 'bert' is not one vlm reads"):
    read_config(tmp_path)
  (tmp_path / "config.json").write_text('{"model_type": "clip",\n "x": }')
  with pytest.raises(ConfigError, match=r"config.json:2: not valid JSON"):
    read_config(tmp_path)


@pytest.mark.parametrize("model_type", sorted(hf_config.DEFAULTS))
def test_every_derived_default_is_declared(model_type):
  """Changing one numeric field of a transformers config class changes no other field of vlm's table,
  unless vlm marks that field DERIVED (computed from the others when absent, as transformers does)."""
  cls = transformers.CONFIG_MAPPING[model_type]
  table = hf_config.DEFAULTS[model_type]
  base = cls().to_dict()
  for key, value in table.items():
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value is DERIVED:
      continue
    try:
      changed = cls(**{key: value * 2 if value else 3}).to_dict()
    except Exception:  # a field the class validates (e.g. a range): not a size other fields follow
      continue
    moved = [k for k in table if k != key and changed.get(k) != base.get(k) and table[k] is not DERIVED]
    assert not moved, f"{model_type}: {key} changes {moved}, which vlm's table does not mark DERIVED"
    for k in table:
      if table[k] is DERIVED and changed.get(k) != base.get(k):  # and vlm derives it the same way
        assert hf_config.from_dict(dict(model_type=model_type, **{key: changed[key]}))[k] == changed[k], k
