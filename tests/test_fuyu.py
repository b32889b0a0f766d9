"""Fuyu (vlm.models.fuyu + vlm.convert.fuyu) against a small random transformers FuyuForCausalLM, and the
Persimmon options of DecoderLM (LayerNorm, qk-norm, partial rotary, relu2).

Checkpoints are written the way transformers 4.x writes the Hub's (conftest.save_hub_style: text_config keys
equal to PersimmonConfig's defaults left out, rope_theta instead of rope_parameters) and the reference is
transformers loading that directory."""

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
from transformers.activations import ACT2FN  # noqa: E402

from conftest import rewrite_checkpoint, save_hub_style  # noqa: E402
from vlm.convert import import_hf  # noqa: E402
from vlm.convert.fuyu import FLAT_TEXT_KEYS, model_kwargs_from_hf_fuyu  # noqa: E402
from vlm.convert.hf_config import ConfigError  # noqa: E402
from vlm.models import build_model  # noqa: E402
from vlm.models.decoder import DecoderLM  # noqa: E402
from vlm.models.fuyu import FuyuPatchEmbed, image_token_layout, patchify  # noqa: E402
from vlm.models import predict_fns  # noqa: E402
from vlm.nn.mlp import Mlp, relu2  # noqa: E402
from vlm.nn.rope import apply_rope, rotary_dims  # noqa: E402

TOL = 1e-4
VOCAB, IMAGE, NEWLINE, EOS = 128, 100, 101, 2
HEIGHT, WIDTH, PATCH = 12, 16, 4
ROWS, COLS = HEIGHT // PATCH, WIDTH // PATCH
NEW = 6


def _make(theta=25000.0, **text):
  torch.manual_seed(0)
  tc = dict(
    model_type="persimmon",
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    qk_layernorm=True,
    layer_norm_eps=1e-5,
    hidden_act="relu2",
    eos_token_id=EOS,
    bos_token_id=1,
    rope_parameters=dict(rope_type="default", rope_theta=theta, partial_rotary_factor=0.5),
  )
  tc.update(text)
  cfg = transformers.FuyuConfig(patch_size=PATCH, num_channels=3, image_token_id=IMAGE, text_config=tc)
  model = transformers.FuyuForCausalLM(cfg).eval()
  with torch.no_grad():  # HF inits LayerNorms to 1 / 0: perturb every tensor
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def _save_and_load(hf, path):
  """(transformers' FuyuForCausalLM loaded from the Hub-style directory written from hf, directory)."""
  path = save_hub_style(hf, path)
  return transformers.FuyuForCausalLM.from_pretrained(path).eval(), path


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  hf, path = _save_and_load(_make(), str(tmp_path_factory.mktemp("hf_fuyu") / "fuyu"))
  name, kwargs, params = import_hf(path)
  assert name == "vision_lm"
  return hf, build_model(name, kwargs), params, kwargs, path


def _hf_image_inputs(pixels):
  """HF's own patchify and placeholder layout (FuyuImageProcessor*.preprocess_with_tokenizer_info):
  (image ids [(ROWS * (COLS + 1)], patches [B, N, p * p * 3]) for NCHW pixels [B, 3, H, W]."""
  proc = transformers.FuyuImageProcessorPil(patch_size={"height": PATCH, "width": PATCH})
  b = pixels.shape[0]
  out = proc.preprocess_with_tokenizer_info(
    image_input=torch.tensor(pixels)[:, None],
    image_present=torch.ones(b, 1, 1),
    image_unpadded_h=torch.full((b, 1), HEIGHT),
    image_unpadded_w=torch.full((b, 1), WIDTH),
    image_placeholder_id=IMAGE,
    image_newline_id=NEWLINE,
    variable_sized=True,
  )
  ids = [np.asarray(out["image_input_ids"][i][0]) for i in range(b)]
  patches = np.stack([np.asarray(out["image_patches"][i][0]) for i in range(b)]).astype(np.float32)
  return ids[0], patches


def _batch(seed, before=3, after=4):
  """Two rows laid out as Fuyu does: text, the image's rows of placeholders + newline, text."""
  rng = np.random.default_rng(seed)
  pixels = rng.normal(size=(2, 3, HEIGHT, WIDTH)).astype(np.float32)  # NCHW, as HF's processor
  image_ids, patches = _hf_image_inputs(pixels)
  np.testing.assert_array_equal(image_ids, image_token_layout(HEIGHT, WIDTH, PATCH, IMAGE, NEWLINE))
  ids = np.stack(
    [
      np.concatenate([rng.integers(3, IMAGE, size=before), image_ids, rng.integers(3, IMAGE, size=after)])
      for _ in range(2)
    ]
  ).astype(np.int64)
  return ids, pixels, patches


def _nhwc(pixels):
  return jnp.asarray(pixels.transpose(0, 2, 3, 1))


def test_logits_match_hf(imported):
  hf, model, params, kwargs, _ = imported
  lm = kwargs["lm_config"]
  assert kwargs["image_token_id"] == IMAGE and kwargs["vision_model"] == "fuyu_patches"
  assert (lm["norm_type"], lm["qk_norm"], lm["rotary_fraction"], lm["mlp_act"]) == ("layer", "layer", 0.5, "relu2")
  assert lm["rope_theta"] == 25000.0 and not lm["tie_embeddings"]
  ids, pixels, patches = _batch(0)
  # The imported tree is exactly the model's (every parameter present, same shapes).
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), _nhwc(pixels), jnp.asarray(ids)))["params"]
  assert jax.tree.map(np.shape, nn.unbox(shapes)) == jax.tree.map(np.shape, params)
  np.testing.assert_array_equal(np.asarray(patchify(_nhwc(pixels), PATCH)), patches)  # HF's patch order
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(patches)).logits.numpy()
  ours = np.asarray(model.apply({"params": params}, _nhwc(pixels), jnp.asarray(ids)))
  diff = float(np.abs(ours - theirs).max())
  print(f"fuyu: max |logits diff| {diff:.2e} over {ours.shape}")
  assert ours.shape == theirs.shape and diff <= TOL


def test_scanned_import_matches_hf(imported):
  from vlm.convert import stack_encoder_blocks

  hf, _, params, _, path = imported
  name, kwargs, scanned = import_hf(path, scan=True)
  assert kwargs["lm_config"]["scan_layers"] and set(scanned["lm"]["decoder"]) == {"layers"}
  jax.tree.map(np.testing.assert_array_equal, scanned, stack_encoder_blocks(params, names=("decoder",)))
  ours, theirs = _logits(hf, kwargs, scanned)
  diff = float(np.abs(ours - theirs).max())
  print(f"fuyu imported with scan=True: max |logits diff| {diff:.2e}")
  assert diff <= TOL


def _logits(hf, kwargs, params, seed=0):
  """(ours, HF's) logits on _batch(seed)."""
  ids, pixels, patches = _batch(seed)
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(patches)).logits.numpy()
  ours = np.asarray(build_model("vision_lm", kwargs).apply({"params": params}, _nhwc(pixels), jnp.asarray(ids)))
  return ours, theirs


# A second tiny Fuyu: rope theta at PersimmonConfig's default 10000 (left out of the file; FuyuConfig 4.x's
# default, and 5.x's FuyuConfig.default_theta, is 25000), a non-default activation and LayerNorm eps (kept).
DEFAULTS_CASE = dict(theta=10000.0, hidden_act="gelu", layer_norm_eps=1e-2)


@pytest.mark.slow
def test_hub_style_defaults_and_non_default_values(tmp_path):
  hf, path = _save_and_load(_make(**DEFAULTS_CASE), tmp_path / "fuyu")
  written = json.load(open(f"{path}/config.json"))["text_config"]
  assert "rope_theta" not in written and "rope_parameters" not in written and "partial_rotary_factor" not in written
  assert (written["hidden_act"], written["layer_norm_eps"]) == ("gelu", 1e-2)
  assert hf.config.text_config.rope_parameters["rope_theta"] == 10000.0
  _, kwargs, params = import_hf(path)
  lm = kwargs["lm_config"]
  assert (lm["rope_theta"], lm["rotary_fraction"], lm["mlp_act"], lm["norm_eps"]) == (10000.0, 0.5, "gelu", 1e-2)
  ours, theirs = _logits(hf, kwargs, params)
  diff = float(np.abs(ours - theirs).max())
  print(f"fuyu (Hub-style, default theta): max |logits diff| {diff:.2e}")
  assert diff <= TOL
  # Each value replaced by what a wrong default gives (the importer ignoring the file) would show.
  diffs = {}
  for key, wrong in (("rope_theta", 25000.0), ("mlp_act", "relu2"), ("norm_eps", 1e-5)):
    kw = copy.deepcopy(kwargs)
    kw["lm_config"][key] = wrong
    diffs[key] = float(np.abs(_logits(hf, kw, params)[0] - theirs).max())
  print(f"fuyu logits max abs diff with a wrong default: {diffs}")
  assert all(d > 1e-3 for d in diffs.values()), diffs


def test_greedy_generation_matches_hf(imported):
  hf, model, params, _, _ = imported
  ids, pixels, patches = _batch(1)
  with torch.no_grad():
    out = hf.generate(
      input_ids=torch.tensor(ids),
      pixel_values=torch.tensor(patches),
      attention_mask=torch.ones(ids.shape, dtype=torch.long),
      do_sample=False,
      max_new_tokens=NEW,
      eos_token_id=EOS,
      pad_token_id=0,
    ).numpy()
  theirs = out[:, ids.shape[1] :]
  theirs = np.pad(theirs, ((0, 0), (0, NEW - theirs.shape[1])), constant_values=0)
  ours = jax.jit(functools.partial(predict_fns(model)["generate"], max_new_tokens=NEW, eos_id=EOS, pad_id=0))(
    params, _nhwc(pixels), jnp.asarray(ids)
  )
  print(f"fuyu greedy: HF {theirs.tolist()} ours {np.asarray(ours.tokens).tolist()}")
  np.testing.assert_array_equal(np.asarray(ours.tokens), theirs)


def test_both_key_layouts_and_flat_config(imported, tmp_path):
  _, _, params, kwargs, path = imported
  assert any(k.startswith("language_model.model.") for k in load_file(f"{path}/model.safetensors"))

  def new_layout(k):  # the module names of transformers >= 5
    for old, new in (
      ("language_model.model.", "model.language_model."),
      ("language_model.lm_head.", "lm_head."),
      ("vision_embed_tokens.", "model.vision_embed_tokens."),
    ):
      if k.startswith(old):
        return new + k[len(old) :]
    raise AssertionError(k)

  _, kw2, params2 = import_hf(rewrite_checkpoint(path, tmp_path / "new", rename=new_layout))
  assert kw2 == kwargs
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  # adept/fuyu-8b's config.json: the Persimmon fields at the top level, v4 rope fields.
  config = json.load(open(f"{path}/config.json"))
  tc = config.pop("text_config")
  assert "rope_parameters" not in tc  # the Hub-style file spells rope 4.x's way
  rope = dict(rope_type="default", rope_theta=tc.pop("rope_theta"), partial_rotary_factor=0.5)
  tc.pop("rope_scaling", None)
  flat = {
    **config,
    **{k: v for k, v in tc.items() if k != "model_type"},
    "rope_theta": rope["rope_theta"],
    "partial_rotary_factor": 0.5,
    "rope_scaling": None,
  }
  assert model_kwargs_from_hf_fuyu(flat) == model_kwargs_from_hf_fuyu(
    dict(config, text_config=dict(tc, **{"rope_parameters": rope}))
  )
  hf_text = transformers.FuyuConfig.from_dict(flat).text_config  # HF reads the flat config the same way
  assert (hf_text.hidden_size, hf_text.vocab_size, hf_text.rope_parameters["rope_theta"]) == (32, VOCAB, 25000.0)
  # The flat file as a checkpoint (text_config null): the same import, and transformers loads it the same way.
  flat_dir = rewrite_checkpoint(path, tmp_path / "flat", config=dict(flat, text_config=None))
  _, kw3, params3 = import_hf(flat_dir)
  assert kw3 == kwargs
  jax.tree.map(np.testing.assert_array_equal, params3, params)
  loaded = transformers.FuyuForCausalLM.from_pretrained(flat_dir).config.text_config
  assert (loaded.hidden_size, loaded.rope_parameters) == (32, hf_text.rope_parameters)


def test_flat_config_reads_as_transformers_5_does():
  """transformers 5's FuyuConfig moves FLAT_TEXT_KEYS of a flat file into the text config (not
  partial_rotary_factor, nor the token ids but eos), and PersimmonConfig's defaults fill the rest: so does vlm."""
  spec = transformers.FuyuConfig.sub_configs_defaults["text_config"]
  assert set(FLAT_TEXT_KEYS) == set(spec.init_kwargs) | {"rope_scaling", "rope_theta"}
  base = dict(
    model_type="fuyu",
    hidden_size=32,
    num_attention_heads=4,
    num_hidden_layers=2,
    intermediate_size=64,
    vocab_size=VOCAB,
  )
  for extra in (
    {},
    {"rope_theta": 25000.0},
    {"rope_theta": 500.0, "partial_rotary_factor": 0.25},
    {"layer_norm_eps": 1e-3, "hidden_act": "gelu", "qk_layernorm": False},
    {"text_config": None},
  ):
    cfg = dict(base, **extra)
    lm = model_kwargs_from_hf_fuyu(cfg)["lm_config"]
    ref = transformers.FuyuConfig.from_dict(cfg).text_config
    rp = ref.rope_parameters
    assert (lm["rope_theta"], lm["rotary_fraction"]) == (rp["rope_theta"], rp["partial_rotary_factor"]), extra
    assert (lm["norm_eps"], lm["qk_norm"] is not None, lm["width"]) == (
      ref.layer_norm_eps,
      ref.qk_layernorm,
      ref.hidden_size,
    ), extra
  # No text keys at all: PersimmonConfig's (8B) defaults, as transformers builds them.
  lm = model_kwargs_from_hf_fuyu({"model_type": "fuyu"})["lm_config"]
  ref = transformers.FuyuConfig.from_dict({"model_type": "fuyu"}).text_config
  assert (lm["width"], lm["depth"], lm["vocab_size"], lm["rope_theta"]) == (
    ref.hidden_size,
    ref.num_hidden_layers,
    ref.vocab_size,
    ref.rope_parameters["rope_theta"],
  )


def test_importer_errors(imported, tmp_path):
  _, _, _, _, path = imported
  missing = "language_model.model.layers.1.self_attn.k_layernorm.bias"
  with pytest.raises(ValueError, match=f"absent: .*{missing}"):
    import_hf(rewrite_checkpoint(path, tmp_path / "missing", drop=(missing,)))
  with pytest.raises(ValueError, match="not used by the Fuyu importer.*extra.weight"):
    import_hf(rewrite_checkpoint(path, tmp_path / "extra", add={"extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match="text_config.hidden_act = 'swiglu'"):
    import_hf(
      rewrite_checkpoint(
        path,
        tmp_path / "act",
        config={"text_config": dict(json.load(open(f"{path}/config.json"))["text_config"], hidden_act="swiglu")},
      )
    )


@pytest.mark.parametrize(
  "sub,key,value",
  [
    ("text_config", "hidden_act", "swiglu"),
    ("text_config", "rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("text_config", "rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
    (None, "hidden_act", "swiglu"),
    (None, "patch_size", 0),
  ],
)
def test_unsupported_value_names_file_key_and_value(imported, tmp_path, sub, key, value):
  """sub None: a top-level key (hidden_act of a flat file, whose text_config is null)."""
  _, _, _, _, path = imported
  written = json.load(open(f"{path}/config.json"))
  if sub is None:
    change = {key: value} if key == "patch_size" else {key: value, "text_config": None}
  else:
    change = {sub: dict(written[sub], **{key: value})}
  dst = rewrite_checkpoint(path, tmp_path / "bad", config=change)
  name = key if sub is None else f"{sub}.{key}"
  message = rf"^{re.escape(dst)}/config.json: {re.escape(name)} = {re.escape(repr(value))}:"
  with pytest.raises(ConfigError, match=message):
    import_hf(dst)


def test_image_size_not_a_multiple_of_patch_raises():
  embed = FuyuPatchEmbed(patch_size=PATCH, width=8)
  with pytest.raises(ValueError, match="13x16 is not a multiple of patch_size=4"):
    embed.init(jax.random.key(0), jnp.zeros((1, 13, 16, 3)))
  with pytest.raises(ValueError, match="not a multiple"):
    image_token_layout(12, 18, PATCH, IMAGE, NEWLINE)


LLAMA = dict(vocab_size=64, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=48)


def test_defaults_keep_llama_params_and_logits(tmp_path):
  """The new DecoderLM fields off: Llama's parameter tree (no norm biases, no qk-norm) and HF Llama's logits."""
  model = DecoderLM(**LLAMA)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 9)))
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
  paths = {"/".join(k) for k in traverse_util.flatten_dict(params)}
  assert {p for p in paths if "block_0/" in p} == {
    f"decoder/block_0/{p}"
    for p in (
      "norm1/scale",
      "norm2/scale",
      "attn/query/kernel",
      "attn/key/kernel",
      "attn/value/kernel",
      "attn/out/kernel",
      "mlp/wi_0/kernel",
      "mlp/wi_1/kernel",
      "mlp/wo/kernel",
    )
  }
  explicit = DecoderLM(**LLAMA, norm_type="rms", qk_norm=None, rotary_fraction=1.0)
  np.testing.assert_array_equal(model.apply({"params": params}, tokens), explicit.apply({"params": params}, tokens))
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(
    transformers.LlamaConfig(
      vocab_size=64,
      hidden_size=32,
      intermediate_size=48,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=64,
      tie_word_embeddings=False,
    )
  ).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(0.1 * torch.randn_like(p))
  hf.save_pretrained(tmp_path / "llama", safe_serialization=True)
  name, kw, hf_params = import_hf(tmp_path / "llama")
  assert "norm_type" not in kw  # the Llama importer is untouched: defaults apply
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(np.asarray(tokens))).logits.numpy()
  ours = np.asarray(build_model(name, kw).apply({"params": hf_params}, tokens))
  diff = float(np.abs(ours - theirs).max())
  print(f"llama defaults: max |logits diff| {diff:.2e}")
  assert diff <= TOL


def test_relu2_mlp():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)), jnp.float32)
  mlp = Mlp(16, act="relu2")
  params = nn.unbox(jax.jit(mlp.init)(jax.random.key(0), x)["params"])
  assert set(params) == {"fc1", "fc2"} and "bias" in params["fc1"]  # not gated, biases
  h = x @ params["fc1"]["kernel"] + params["fc1"]["bias"]
  want = np.square(np.maximum(h, 0)) @ params["fc2"]["kernel"] + params["fc2"]["bias"]
  np.testing.assert_allclose(np.asarray(mlp.apply({"params": params}, x)), want, rtol=1e-5, atol=1e-6)
  v = np.linspace(-3, 3, 13, dtype=np.float32)
  np.testing.assert_allclose(np.asarray(relu2(jnp.asarray(v))), ACT2FN["relu2"](torch.tensor(v)).numpy())


def test_partial_rotary_matches_persimmon():
  from transformers.models.persimmon import modeling_persimmon as mp

  hd, fraction, theta = 8, 0.5, 25000.0
  r = rotary_dims(hd, fraction)
  assert r == 4
  x = np.random.default_rng(0).normal(size=(2, 5, 3, hd)).astype(np.float32)  # [B, T, H, hd]
  pos = np.array([[0, 1, 2, 3, 4], [3, 4, 5, 9, 20]])
  ours = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), theta, r))
  cfg = transformers.PersimmonConfig(
    hidden_size=hd * 3,
    num_attention_heads=3,
    rope_parameters=dict(rope_type="default", rope_theta=theta, partial_rotary_factor=fraction),
  )
  xt = torch.tensor(x).transpose(1, 2)  # HF: [B, H, T, hd]
  cos, sin = mp.PersimmonRotaryEmbedding(cfg)(xt, torch.tensor(pos))
  rot, _ = mp.apply_rotary_pos_emb(xt[..., :r], xt[..., :r], cos, sin)
  theirs = torch.cat([rot, xt[..., r:]], dim=-1).transpose(1, 2).numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(ours[..., r:], x[..., r:])  # the pass-through half
  np.testing.assert_array_equal(
    np.asarray(apply_rope(jnp.asarray(x), pos, theta, hd)), np.asarray(apply_rope(jnp.asarray(x), pos, theta))
  )
  with pytest.raises(ValueError, match="rotated channels"):
    rotary_dims(8, 0.2)  # 1 channel: no pair to rotate


@pytest.mark.slow
def test_persimmon_decoder_cached_decoding_equals_forward():
  model = DecoderLM(
    **LLAMA,
    norm_type="layer",
    qk_norm="layer",
    rotary_fraction=0.5,
    mlp_act="relu2",
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    norm_eps=1e-5,
  )
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 7)))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
  assert set(params["decoder"]["block_0"]["attn"]["query_norm"]) == {"scale", "bias"}
  assert params["decoder"]["block_0"]["attn"]["query_norm"]["scale"].shape == (8,)  # over head_dim
  full = model.apply({"params": params}, tokens)
  logits, cache = model.apply({"params": params}, tokens[:, :5], 0, 7, method=DecoderLM.decode_step, mutable=["cache"])
  steps = [logits]
  for t in (5, 6):
    out, cache = model.apply(
      {"params": params, **cache}, tokens[:, t : t + 1], t, method=DecoderLM.decode_step, mutable=["cache"]
    )
    steps.append(out)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)
