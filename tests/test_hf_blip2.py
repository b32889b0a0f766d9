"""HF Blip2ForConditionalGeneration import (vlm.convert.blip2.import_hf_blip2) against a small random
transformers model with a Llama LM: logits and greedy generations of our VisionLanguageModel.

The checkpoint is written the way transformers 4.x writes the Hub's (conftest.save_hub_style: default
values left out, rope_theta instead of rope_parameters) and the reference is transformers loading that
directory. Its vision / Q-Former LayerNorm eps and the LM's rope theta are non-default (in the file),
everything else default (absent): test_non_default_values_would_show checks that importing with the
default instead of the file's value would move the logits by more than 1e-3."""

import copy
import functools
import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import traverse_util  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from conftest import rewrite_checkpoint, save_hub_style  # noqa: E402
from vlm.convert import import_hf, import_hf_blip2  # noqa: E402
from vlm.convert.hf_config import ConfigError  # noqa: E402
from vlm.models import build_model  # noqa: E402
from vlm.models import predict_fns  # noqa: E402

TOL = 1e-4
VOCAB, IMAGE, PAD, BOS, EOS = 200, 150, 0, 1, 2
SIZE, PATCH, QUERIES = 32, 8, 6
NEW = 5
# Non-default values (kept in the Hub-style file); transformers' defaults: 1e-6, 1e-12, 10000.
VISION_EPS, QFORMER_EPS, LM_THETA = 1e-2, 1e-2, 500.0


def _config(text=None):
  vc = dict(
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=SIZE,
    patch_size=PATCH,
    layer_norm_eps=VISION_EPS,
  )
  qc = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=48,
    cross_attention_frequency=2,
    encoder_hidden_size=32,
    layer_norm_eps=QFORMER_EPS,
  )
  tc = text or transformers.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
    tie_word_embeddings=False,
    rope_parameters=dict(rope_type="default", rope_theta=LM_THETA),
  )
  return transformers.Blip2Config(
    vision_config=vc, qformer_config=qc, text_config=tc, num_query_tokens=QUERIES, image_token_index=IMAGE
  )


@functools.cache
def _imported(root):
  """(transformers' model loaded from the Hub-style directory, our model, params, kwargs, directory)."""
  torch.manual_seed(0)
  hf = transformers.Blip2ForConditionalGeneration(_config()).eval()
  with torch.no_grad():  # HF inits norms to 1, biases and query_tokens to 0: perturb every tensor
    for p in hf.parameters():
      p.add_(0.1 * torch.randn_like(p))
  path = save_hub_style(hf, f"{root}/blip2")
  loaded = transformers.Blip2ForConditionalGeneration.from_pretrained(path).eval()
  name, kwargs, params = import_hf(path)
  assert name == "vision_lm"
  return loaded, build_model(name, kwargs), params, kwargs, path


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  return _imported(str(tmp_path_factory.mktemp("hf_blip2")))


def _prompt(rng, text=5):
  """As Blip2Processor: num_query_tokens image placeholders, BOS, then the text."""
  return np.concatenate([np.full(QUERIES, IMAGE), [BOS], rng.integers(3, 100, size=text)])


def _pixels(rng, n):
  return rng.normal(size=(n, 3, SIZE, SIZE)).astype(np.float32)  # NCHW


def _nhwc(pixels):
  return jnp.asarray(pixels.transpose(0, 2, 3, 1))


def test_kwargs_and_params_are_exactly_what_init_creates(imported):
  _, model, params, kwargs, _ = imported
  assert kwargs["vision_model"] == "blip2_qformer" and kwargs["vision_method"] == "query_features"
  assert kwargs["connector_type"] == "linear" and kwargs["image_token_id"] == IMAGE
  vc = kwargs["vision_config"]
  assert vc["num_query_tokens"] == QUERIES and vc["qformer"]["depth"] == 3 and vc["image"]["depth"] == 2
  assert kwargs["lm_config"]["num_kv_heads"] == 2 and not kwargs["lm_config"]["tie_embeddings"]
  shapes = jax.eval_shape(
    lambda: nn.unbox(
      model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), jnp.zeros((1, QUERIES + 2), jnp.int32))["params"]
    )
  )
  ours = {k: v.shape for k, v in traverse_util.flatten_dict(params).items()}
  init = {k: v.shape for k, v in traverse_util.flatten_dict(shapes).items()}
  assert ours == init, (sorted(set(init) - set(ours)), sorted(set(ours) - set(init)))
  assert not any("word_embed" in "/".join(k) or "mlp_text" in "/".join(k) for k in ours)


def test_hub_style_file_leaves_the_defaults_out(imported):
  """What the parity tests are about: the file omits the default-valued keys (and spells rope 4.x's way),
  and the importer fills them with transformers' defaults, the non-default ones with the file's."""
  _, _, _, kwargs, path = imported
  written = json.load(open(f"{path}/config.json"))
  vc, qc, tc = written["vision_config"], written["qformer_config"], written["text_config"]
  assert "hidden_act" not in vc and "qkv_bias" not in vc and vc["layer_norm_eps"] == VISION_EPS
  assert not {"hidden_act", "hidden_dropout_prob", "pad_token_id"} & set(qc) and qc["layer_norm_eps"] == QFORMER_EPS
  assert "rope_parameters" not in tc and tc["rope_theta"] == LM_THETA and "rms_norm_eps" not in tc
  image, qformer, lm = kwargs["vision_config"]["image"], kwargs["vision_config"]["qformer"], kwargs["lm_config"]
  assert (image["mlp_act"], image["norm_eps"]) == ("gelu", VISION_EPS)
  assert (qformer["mlp_act"], qformer["norm_eps"], qformer["dropout"], qformer["pad_id"]) == (
    "gelu",
    QFORMER_EPS,
    0.1,
    0,
  )
  assert (lm["rope_theta"], lm["norm_eps"], lm["mlp_act"]) == (LM_THETA, 1e-6, "swiglu")


def _hf_logits(hf, ids, pixels):
  with torch.no_grad():
    return hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()


@pytest.mark.slow
def test_logits_match_hf(imported):
  hf, model, params, _, _ = imported
  rng = np.random.default_rng(0)
  ids = np.stack([_prompt(rng) for _ in range(2)])
  pixels = _pixels(rng, 2)
  theirs = _hf_logits(hf, ids, pixels)
  with torch.no_grad():
    hf_queries = hf.get_image_features(pixel_values=torch.tensor(pixels)).pooler_output.numpy()
  ours = np.asarray(model.apply({"params": params}, _nhwc(pixels), jnp.asarray(ids)))
  our_queries = np.asarray(model.apply({"params": params}, _nhwc(pixels), method="encode_images"))
  diffs = {
    "projected queries": float(np.abs(our_queries - hf_queries).max()),
    "logits": float(np.abs(ours - theirs).max()),
  }
  print(f"BLIP-2 stage 2 max abs diffs: {diffs}")
  assert ours.shape == theirs.shape and all(d <= TOL for d in diffs.values()), diffs


def test_scanned_import_scans_the_vit_and_the_lm(imported):
  """scan=True: vision/img/encoder/layers and lm/decoder/layers (the Q-Former stays unrolled), HF's logits."""
  from vlm.convert import stack_encoder_blocks

  hf, _, params, _, path = imported
  name, kwargs, scanned = import_hf(path, scan=True)
  assert kwargs["vision_config"]["image"]["scan"] and kwargs["lm_config"]["scan_layers"]
  assert "block_0" in scanned["vision"]["qformer"]
  jax.tree.map(np.testing.assert_array_equal, scanned, stack_encoder_blocks(params, names=("encoder", "decoder")))
  model = build_model(name, kwargs)
  rng = np.random.default_rng(0)
  ids = np.stack([_prompt(rng) for _ in range(2)])
  pixels = _pixels(rng, 2)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), _nhwc(pixels), jnp.asarray(ids))["params"]))
  assert jax.tree.map(np.shape, shapes) == jax.tree.map(np.shape, scanned)
  diff = float(
    np.abs(
      np.asarray(model.apply({"params": scanned}, _nhwc(pixels), jnp.asarray(ids))) - _hf_logits(hf, ids, pixels)
    ).max()
  )
  print(f"BLIP-2 stage 2 imported with scan=True: max |logits diff| {diff:.2e}")
  assert diff <= TOL


def _replaced(kwargs, keys, value):
  """A deep copy of nested kwargs with kwargs[k0][k1]... = value."""
  out = copy.deepcopy(kwargs)
  d = out
  for k in keys[:-1]:
    d = d[k]
  d[keys[-1]] = value
  return out


@pytest.mark.slow
def test_non_default_values_would_show(imported):
  """Each non-default value of the file, replaced by transformers' default (what an importer ignoring the key
  would produce), moves the logits by more than 1e-3: the parity test would catch it."""
  hf, _, params, kwargs, _ = imported
  rng = np.random.default_rng(0)
  ids = np.stack([_prompt(rng) for _ in range(2)])
  pixels = _pixels(rng, 2)
  theirs = _hf_logits(hf, ids, pixels)
  diffs = {}
  for keys, default in (
    (("vision_config", "image", "norm_eps"), 1e-6),
    (("vision_config", "qformer", "norm_eps"), 1e-12),
    (("lm_config", "rope_theta"), 10000.0),
  ):
    model = build_model("vision_lm", _replaced(kwargs, keys, default))
    ours = np.asarray(model.apply({"params": params}, _nhwc(pixels), jnp.asarray(ids)))
    diffs["/".join(keys)] = float(np.abs(ours - theirs).max())
  print(f"BLIP-2 logits max abs diff with a default instead of the file's value: {diffs}")
  assert all(d > 1e-3 for d in diffs.values()), diffs


def test_greedy_generation_matches_hf(imported):
  hf, model, params, _, _ = imported
  rng = np.random.default_rng(1)
  ids = np.stack([_prompt(rng, text=3) for _ in range(2)])
  pixels = _pixels(rng, 2)
  with torch.no_grad():
    out = hf.generate(
      pixel_values=torch.tensor(pixels),
      input_ids=torch.tensor(ids),
      attention_mask=torch.ones(ids.shape, dtype=torch.long),
      do_sample=False,
      max_new_tokens=NEW,
      eos_token_id=EOS,
      pad_token_id=PAD,
    ).numpy()
  theirs = out[:, ids.shape[1] :]  # the LM's generate returns the prompt too
  theirs = np.pad(theirs, ((0, 0), (0, NEW - theirs.shape[1])), constant_values=PAD)
  ours = jax.jit(functools.partial(predict_fns(model)["generate"], max_new_tokens=NEW, eos_id=EOS, pad_id=PAD))(
    params, _nhwc(pixels), jnp.asarray(ids)
  )
  print(f"HF {theirs.tolist()} ours {np.asarray(ours.tokens).tolist()}")
  np.testing.assert_array_equal(np.asarray(ours.tokens), theirs)


def _new_layout(k):  # LLaVA-style names of transformers >= 4.52 (model.language_model.*, lm_head.*, model.*)
  if k.startswith("language_model.model."):
    return "model.language_model." + k[len("language_model.model.") :]
  if k.startswith("language_model.lm_head."):
    return k[len("language_model.") :]
  return "model." + k


def test_new_key_layout_imports_the_same(imported, tmp_path):
  _, _, params, kwargs, path = imported
  assert any(k.startswith("language_model.model.") for k in load_file(f"{path}/model.safetensors"))
  _, kw2, params2 = import_hf(rewrite_checkpoint(path, tmp_path / "new", rename=_new_layout))
  assert kw2 == kwargs
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  hf = imported[0]  # a state dict (torch tensors) with the transformers config
  _, kw3, params3 = import_hf_blip2(hf.state_dict(), hf.config)
  assert kw3 == kwargs
  jax.tree.map(np.testing.assert_array_equal, params3, params)


def test_missing_unused_and_unsupported_raise(imported, tmp_path):
  _, _, _, _, path = imported
  for i, key in enumerate(
    (
      "language_model.model.layers.1.mlp.up_proj.weight",
      "qformer.encoder.layer.2.crossattention.attention.value.bias",
      "vision_model.encoder.layers.1.mlp.fc2.weight",
      "language_projection.bias",
    )
  ):
    with pytest.raises(ValueError, match=rf"absent: \['{key}'\]"):
      import_hf(rewrite_checkpoint(path, tmp_path / f"missing{i}", drop=(key,)))
  extra = ["qformer.embeddings.word_embeddings.weight", "language_model.model.layers.9.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match=rf"not used .*{re.escape(str(sorted(extra)))}"):
    import_hf(rewrite_checkpoint(path, tmp_path / "extra", add={k: np.zeros((2, 2), np.float32) for k in extra}))
  opt = json.loads(json.dumps(_config(transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32)).to_dict()))
  with pytest.raises(NotImplementedError, match="config.json: text_config.model_type = 'opt'"):
    import_hf(rewrite_checkpoint(path, tmp_path / "opt", config=opt))
  with pytest.raises(ValueError, match="image_token_index"):
    import_hf(rewrite_checkpoint(path, tmp_path / "no_token", config={"image_token_index": None}))


@pytest.mark.parametrize(
  "sub,key,value",
  [
    ("vision_config", "hidden_act", "relu6"),
    ("qformer_config", "hidden_act", "relu6"),
    ("qformer_config", "cross_attention_frequency", 0),
    ("text_config", "hidden_act", "relu6"),
  ],
)
def test_unsupported_value_names_file_key_and_value(imported, tmp_path, sub, key, value):
  _, _, _, _, path = imported
  written = json.load(open(f"{path}/config.json"))
  dst = rewrite_checkpoint(path, tmp_path / "bad", config={sub: dict(written[sub], **{key: value})})
  with pytest.raises(ConfigError, match=rf"^{re.escape(dst)}/config.json: {sub}\.{key} = {re.escape(repr(value))}:"):
    import_hf(dst)


def test_flan_t5_config_imports_the_vision_side_only(imported, tmp_path):
  """A BLIP-2 Flan-T5 config.json (Hub-style text_config of model_type 't5'): the vision tower and Q-Former import
  (they do not depend on the LM); the whole model is NotImplementedError naming the file and the LM's type."""
  from conftest import hub_style_config
  from vlm.convert import import_hf_blip2_qformer, import_hf_blip2_vision

  _, _, params, kwargs, path = imported
  t5 = _config(transformers.T5Config(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=2, d_ff=64))
  dst = rewrite_checkpoint(path, tmp_path / "t5", config={"text_config": hub_style_config(t5.to_dict())["text_config"]})
  vkw, vparams = import_hf_blip2_vision(dst)
  assert vkw == kwargs["vision_config"]["image"]
  jax.tree.map(np.testing.assert_array_equal, vparams, params["vision"]["img"])
  qkw, qparams, query = import_hf_blip2_qformer(dst)
  assert dict(qkw, vocab_size=None) == kwargs["vision_config"]["qformer"] and query.shape == (1, QUERIES, 32)
  with pytest.raises(NotImplementedError, match=rf"^{re.escape(dst)}/config.json: text_config.model_type = 't5'"):
    import_hf(dst)


def test_queries_only_qformer_builds_with_exactly_the_checkpoint_params(imported):
  _, model, params, kwargs, _ = imported
  assert kwargs["vision_config"]["qformer"]["vocab_size"] is None
  model = build_model("vision_lm", kwargs)
  shapes = jax.eval_shape(
    lambda: nn.unbox(
      model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), jnp.zeros((1, QUERIES + 2), jnp.int32))["params"]
    )
  )
  init = set(traverse_util.flatten_dict(shapes))
  assert init == set(traverse_util.flatten_dict(params))


def test_retrieval_checkpoint_goes_to_the_stage1_importer(tmp_path):
  torch.manual_seed(0)
  cfg = _config()
  cfg.qformer_config.use_qformer_text_input, cfg.qformer_config.vocab_size = True, 99
  cfg.qformer_config.max_position_embeddings = 16
  transformers.Blip2ForImageTextRetrieval(cfg).save_pretrained(tmp_path, safe_serialization=True)
  name, kwargs, params = import_hf(tmp_path)
  assert name == "blip2_qformer" and kwargs["num_query_tokens"] == QUERIES and kwargs["qformer"]["vocab_size"] == 99
  assert "itm_head" in params and "language_projection" not in params
