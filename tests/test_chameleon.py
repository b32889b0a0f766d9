"""Chameleon's text decoder (vlm.convert.chameleon -> DecoderLM with qk_norm='layer_per_head' and swin_norm)
against a small random transformers ChameleonForConditionalGeneration.

HF's forward sets the logits of the VQ image tokens (vocabulary_map 'IMGIMG...') to float32's min; our
DecoderLM does not, so logits are compared on the other (text) columns and greedy decoding runs through
vlm.convert.chameleon.suppress_tokens, which applies the same mask.

The checkpoints are written the way transformers 4.x writes the Hub's (conftest.save_hub_style: rope_theta
instead of rope_parameters, vq_config keys at their defaults left out) and the reference is transformers
loading that directory."""

import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from conftest import rewrite_checkpoint, save_hub_style  # noqa: E402
from vlm import decoding  # noqa: E402
from vlm.convert import import_hf  # noqa: E402
from vlm.convert.chameleon import image_token_ids, model_kwargs_from_hf_chameleon, suppress_tokens  # noqa: E402
from vlm.convert.hf_config import ConfigError  # noqa: E402
from vlm.models import build_model  # noqa: E402
from vlm.models import generation  # noqa: E402
from vlm.models.generation import init_cache  # noqa: E402
from vlm.nn.attention import MultiHeadAttention, make_qk_norm  # noqa: E402

TOL = 1e-4
VOCAB, TEXT, NUM_IMAGE, EOS = 300, 260, 16, 2  # ids [TEXT, TEXT + NUM_IMAGE) are VQ image tokens
NEW = 6


def _vocabulary_map():
  vocab = {f"t{i}": i for i in range(TEXT)}
  vocab["<image>"] = 8
  for code in range(NUM_IMAGE):  # HF's naming: IMGIMG + the code's digits as letters (0 -> A) + Z
    vocab["IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(code)) + "Z"] = TEXT + code
  return vocab


def _make(swin_norm: bool):
  torch.manual_seed(0)
  vq = dict(
    embed_dim=4,
    num_embeddings=NUM_IMAGE,
    latent_channels=4,
    resolution=16,
    in_channels=3,
    base_channels=32,
    channel_multiplier=[1, 1],
    num_res_blocks=1,
    attn_resolutions=[],
  )
  cfg = transformers.ChameleonConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    swin_norm=swin_norm,
    rope_parameters=dict(rope_type="default", rope_theta=5000.0),
    vq_config=vq,
    vocabulary_map=_vocabulary_map(),
    eos_token_id=EOS,
    bos_token_id=1,
  )
  model = transformers.ChameleonForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # HF inits norms to 1 / 0: perturb every decoder tensor (per-head q/k norms differ)
    for name, p in model.named_parameters():
      if "vqmodel" not in name:
        p.add_(0.1 * torch.randn_like(p))
    model.lm_head.weight[TEXT : TEXT + NUM_IMAGE] *= 5  # unmasked, image tokens would win the argmax
  return model


@pytest.fixture(scope="module", params=[False, True], ids=["pre_norm", "swin_norm"])
def imported(request, tmp_path_factory):
  path = save_hub_style(_make(request.param), str(tmp_path_factory.mktemp("hf_chameleon") / "chameleon"))
  hf = transformers.ChameleonForConditionalGeneration.from_pretrained(path).eval()
  name, kwargs, params = import_hf(path)
  assert name == "decoder_lm"
  return hf, build_model(name, kwargs), params, kwargs, path


def _tokens(seed, shape=(2, 11)):
  return np.random.default_rng(seed).integers(3, TEXT, size=shape).astype(np.int64)


def test_logits_match_hf(imported):
  hf, model, params, kw, path = imported
  assert (kw["qk_norm"], kw["norm_type"], kw["mlp_act"]) == ("layer_per_head", "rms", "swiglu")
  assert kw["swin_norm"] == hf.config.swin_norm and (kw["num_heads"], kw["num_kv_heads"]) == (4, 2)
  assert kw["rope_theta"] == 5000.0 and not kw["tie_embeddings"] and not kw["qkv_bias"]
  assert any(k.startswith("model.vqmodel.") for k in load_file(f"{path}/model.safetensors"))  # ignored
  attn = params["decoder"]["block_0"]["attn"]
  assert attn["query_norm"]["scale"].shape == (4, 16) and attn["key_norm"]["bias"].shape == (2, 16)
  ids = _tokens(0)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.asarray(ids)))["params"]
  assert jax.tree.map(np.shape, nn.unbox(shapes)) == jax.tree.map(np.shape, params)
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids)).logits.numpy()
  ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))
  image = image_token_ids(json.load(open(f"{path}/config.json")))
  np.testing.assert_array_equal(image, np.arange(TEXT, TEXT + NUM_IMAGE))
  assert (theirs[..., image] == np.finfo(np.float32).min).all()  # HF's image-token suppression
  assert np.isin(ours.argmax(-1), image).mean() > 0.5  # ours keeps image-token logits (early fusion)
  text = np.setdiff1d(np.arange(VOCAB), image)
  diff = float(np.abs(ours[..., text] - theirs[..., text]).max())
  print(f"chameleon (swin_norm={kw['swin_norm']}): max |logits diff| {diff:.2e} over text columns of {ours.shape}")
  assert ours.shape == theirs.shape and diff <= TOL
  # The file spells rope 4.x's way; an importer reading rope_parameters' default theta would be off by this:
  written = json.load(open(f"{path}/config.json"))
  assert "rope_parameters" not in written and written["rope_theta"] == 5000.0
  wrong = build_model("decoder_lm", dict(kw, rope_theta=10000.0))
  off = float(
    np.abs(np.asarray(jax.jit(wrong.apply)({"params": params}, jnp.asarray(ids)))[..., text] - theirs[..., text]).max()
  )
  print(f"chameleon logits max abs diff with the default theta 10000 instead of the file's 5000: {off:.2e}")
  assert off > 1e-3


def test_scanned_import(imported):
  """scan=True: the same tensors stacked (decoder/layers, per-head q/k norms [depth, heads, hd]); HF's logits."""
  from vlm.convert import stack_encoder_blocks

  hf, _, params, kw, path = imported
  name, kwargs, scanned = import_hf(path, scan=True)
  assert kwargs == dict(kw, scan_layers=True)
  assert scanned["decoder"]["layers"]["attn"]["query_norm"]["scale"].shape == (2, 4, 16)
  jax.tree.map(np.testing.assert_array_equal, scanned, stack_encoder_blocks(params, names=("decoder",)))
  if kw["swin_norm"]:
    return  # one logits check is enough: the scan is the same for both norm placements
  ids = _tokens(0)
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids)).logits.numpy()
  ours = np.asarray(build_model(name, kwargs).apply({"params": scanned}, jnp.asarray(ids)))
  text = np.setdiff1d(np.arange(VOCAB), image_token_ids(json.load(open(f"{path}/config.json"))))
  diff = float(np.abs(ours[..., text] - theirs[..., text]).max())
  print(f"chameleon imported with scan=True: max |logits diff| {diff:.2e}")
  assert diff <= TOL


def test_absent_keys_take_chameleon_defaults():
  """A config.json that gives only the sizes reads as transformers' ChameleonConfig does (eps, rope theta, biases,
  swin_norm, tying). num_key_value_heads is given: ChameleonConfig's default is 32, not num_attention_heads."""
  given = dict(
    model_type="chameleon",
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
  )
  kw = model_kwargs_from_hf_chameleon(given)
  ref = transformers.ChameleonConfig(**{k: v for k, v in given.items() if k != "model_type"})
  assert (kw["norm_eps"], kw["num_kv_heads"], kw["rope_theta"]) == (
    ref.rms_norm_eps,
    ref.num_key_value_heads,
    ref.rope_parameters["rope_theta"],
  )
  assert (kw["qkv_bias"], kw["mlp_bias"], kw["swin_norm"], kw["tie_embeddings"]) == (
    ref.attention_bias,
    ref.mlp_bias,
    ref.swin_norm,
    ref.tie_word_embeddings,
  )


def test_greedy_generation_matches_hf(imported):
  hf, model, params, _, path = imported
  ids = _tokens(1, (2, 7))
  with torch.no_grad():
    out = hf.generate(
      input_ids=torch.tensor(ids),
      attention_mask=torch.ones(ids.shape, dtype=torch.long),
      do_sample=False,
      max_new_tokens=NEW,
      eos_token_id=EOS,
      pad_token_id=0,
      output_logits=True,
      return_dict_in_generate=True,
    )
  theirs = out.sequences.numpy()[:, ids.shape[1] :]
  steps = theirs.shape[1]
  theirs = np.pad(theirs, ((0, 0), (0, NEW - steps)), constant_values=0)
  # HF's log-prob of each greedy token (its logits: image tokens suppressed), summed up to EOS inclusive.
  logp = torch.log_softmax(torch.stack(out.logits, 1), -1).numpy()  # [B, steps, V]
  ended = np.cumsum(theirs[:, :steps] == EOS, axis=1) - (theirs[:, :steps] == EOS)  # EOS already emitted
  their_scores = np.where(ended == 0, np.take_along_axis(logp, theirs[:, :steps, None], -1)[..., 0], 0).sum(1)
  step_fn = suppress_tokens(generation.step_fn(model, params), image_token_ids(json.load(open(f"{path}/config.json"))))

  @jax.jit
  def greedy(prompt):
    cache = init_cache(model, params, prompt, prompt.shape[1] + NEW)
    return decoding.generate(step_fn, cache, prompt, max_new_tokens=NEW, eos_id=EOS, pad_id=0)

  result = greedy(jnp.asarray(ids, jnp.int32))
  ours = np.asarray(result.tokens)
  diff = float(np.abs(np.asarray(result.scores) - their_scores).max())
  print(f"chameleon greedy: HF {theirs.tolist()} ours {ours.tolist()}; max |sum log-prob diff| {diff:.2e}")
  np.testing.assert_array_equal(ours, theirs)
  assert diff <= TOL  # the KV-cached decoding's log-probs are HF's


def test_layer_per_head_matches_chameleon_layernorm():
  from transformers.models.chameleon.modeling_chameleon import ChameleonLayerNorm

  heads, hd = 3, 8
  x = np.random.default_rng(0).normal(size=(2, 5, heads, hd)).astype(np.float32) * 3 + 1
  torch.manual_seed(0)
  ref = ChameleonLayerNorm((heads, hd))
  with torch.no_grad():
    ref.weight.copy_(torch.randn(heads, hd))
    ref.bias.copy_(torch.randn(heads, hd))
    theirs = ref(torch.tensor(x)).numpy()
  norm = make_qk_norm("layer_per_head", 1e-5)
  params = {"scale": ref.weight.detach().numpy(), "bias": ref.bias.detach().numpy()}
  assert jax.tree.map(np.shape, nn.unbox(jax.eval_shape(norm.init, jax.random.key(0), jnp.asarray(x))["params"])) == {
    "scale": (heads, hd),
    "bias": (heads, hd),
  }
  np.testing.assert_allclose(np.asarray(norm.apply({"params": params}, jnp.asarray(x))), theirs, atol=1e-5)
  # In attention: [N, hd] for queries, [K, hd] for keys (grouped KV heads); 'layer' stays shared [hd].
  x = jnp.zeros((1, 4, 32))

  def param_shapes(mha):
    return jax.tree.map(np.shape, nn.unbox(jax.eval_shape(mha.init, jax.random.key(0), x)["params"]))

  for kind, q_shape, k_shape in (("layer_per_head", (4, 8), (2, 8)), ("layer", (8,), (8,))):
    p = param_shapes(MultiHeadAttention(num_heads=4, num_kv_heads=2, qk_norm=kind))
    assert (p["query_norm"]["scale"], p["key_norm"]["bias"]) == (q_shape, k_shape)
  with pytest.raises(ValueError, match="qk_norm must be one of"):
    param_shapes(MultiHeadAttention(num_heads=4, qk_norm="per_head"))


def test_unsupported_config_options_raise(imported, tmp_path):
  """A ConfigError naming the file, the key and its value (the rope in both spellings)."""
  _, _, _, _, path = imported
  config = json.load(open(f"{path}/config.json"))
  for i, (change, message) in enumerate(
    (
      ({"rms_norm_eps": 1e-6}, "DecoderLM shares norm_eps"),
      ({"rope_parameters": dict(rope_type="linear", rope_theta=5000.0, factor=2.0)}, "rope_type 'linear'"),
      ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
      ({"hidden_act": "gelu"}, "not supported"),
      ({"head_dim": 8}, "!= hidden_size / num_attention_heads"),
    )
  ):
    dst = rewrite_checkpoint(path, tmp_path / f"config{i}", config=dict(config, **change))
    ((key, value),) = change.items()
    want = rf"^{re.escape(dst)}/config.json: {key} = {re.escape(repr(value))}: .*{re.escape(message)}"
    with pytest.raises(ConfigError, match=want):
      import_hf(dst)
  missing = "model.layers.1.self_attn.k_norm.bias"
  with pytest.raises(ValueError, match=f"absent: .*{missing}"):
    import_hf(rewrite_checkpoint(path, tmp_path / "missing", drop=(missing,)))
  with pytest.raises(ValueError, match="not used by the Chameleon importer.*extra.weight"):
    import_hf(rewrite_checkpoint(path, tmp_path / "extra", add={"extra.weight": np.zeros(3, np.float32)}))
