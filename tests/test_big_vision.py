"""big_vision two-tower `.npz` import (vlm.convert.big_vision) against small random transformers SiglipModels.

The npz files are written in big_vision's tree layout by the inverse of transformers'
models/siglip/convert_siglip_to_hf.py mapping (which maps big_vision's SigLIP npz onto SiglipModel),
unrolled (`encoderblock_{i}`) and scanned (`encoderblock`, leading depth axis), with and without the
`params/` prefix of the published files.
"""

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vlm.convert import import_big_vision  # noqa: E402
from vlm.models import build_model  # noqa: E402
from vlm.models.text import TextTransformer  # noqa: E402
from vlm.nn import MAPHead  # noqa: E402

TOL = 1e-4
VOCAB, TEXT_LEN, IMAGE, PATCH = 99, 16, 32, 8
MEASURED: dict[str, float] = {}  # max abs differences, printed at the end of the module (pytest -s)


def _make_siglip(seed: int = 0):
  """Asymmetric towers (as SigLIP 2 g-opt: the text head maps the text width to the image width), every
  parameter randomised (no LayerNorm left at 1/0, no zero bias) so a swapped or dropped tensor shows."""
  torch.manual_seed(seed)
  cfg = transformers.SiglipConfig(
    text_config=dict(
      hidden_size=24,
      intermediate_size=40,
      num_hidden_layers=3,
      num_attention_heads=2,
      vocab_size=VOCAB,
      max_position_embeddings=TEXT_LEN,
      projection_size=32,
      pad_token_id=1,
      bos_token_id=None,
      eos_token_id=1,
    ),
    vision_config=dict(
      hidden_size=32,
      intermediate_size=56,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=IMAGE,
      patch_size=PATCH,
    ),
  )
  model = transformers.SiglipModel(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
    model.logit_scale.fill_(1.7)
    model.logit_bias.fill_(-3.0)
  return model


def _bv_tree(model, scanned: bool) -> dict[str, np.ndarray]:
  """SiglipModel's weights in big_vision's flat tree (no prefix): convert_siglip_to_hf.py inverted."""
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
  used, out = set(), {}

  def take(k):
    used.add(k)
    return sd[k]

  def heads_kernel(w, h):  # torch Linear [h*hd, D] -> flax [D, h, hd]
    return w.T.reshape(w.shape[1], h, -1)

  def attention(dst, w, b, wo, bo, h):  # q/k/v weights and biases, then the output projection
    for name, wi, bi in zip(("query", "key", "value"), w, b):
      out[f"{dst}/{name}/kernel"] = heads_kernel(wi, h)
      out[f"{dst}/{name}/bias"] = bi.reshape(h, -1)
    out[f"{dst}/out/kernel"] = wo.T.reshape(h, -1, wo.shape[0])
    out[f"{dst}/out/bias"] = bo

  def dense(dst, src):
    out[f"{dst}/kernel"] = take(f"{src}.weight").T
    out[f"{dst}/bias"] = take(f"{src}.bias")

  def norm(dst, src):
    out[f"{dst}/scale"] = take(f"{src}.weight")
    out[f"{dst}/bias"] = take(f"{src}.bias")

  def encoder(dst, src, depth, h):
    blocks = []
    for i in range(depth):
      before = set(out)
      b = f"{dst}/encoderblock_{i}"
      s = f"{src}.layers.{i}"
      norm(f"{b}/LayerNorm_0", f"{s}.layer_norm1")
      norm(f"{b}/LayerNorm_1", f"{s}.layer_norm2")
      attention(
        f"{b}/MultiHeadDotProductAttention_0",
        [take(f"{s}.self_attn.{n}_proj.weight") for n in "qkv"],
        [take(f"{s}.self_attn.{n}_proj.bias") for n in "qkv"],
        take(f"{s}.self_attn.out_proj.weight"),
        take(f"{s}.self_attn.out_proj.bias"),
        h,
      )
      dense(f"{b}/MlpBlock_0/Dense_0", f"{s}.mlp.fc1")
      dense(f"{b}/MlpBlock_0/Dense_1", f"{s}.mlp.fc2")
      blocks.append({k[len(b) + 1 :]: out.pop(k) for k in set(out) - before})
    if scanned:
      for sub in blocks[0]:
        out[f"{dst}/encoderblock/{sub}"] = np.stack([blk[sub] for blk in blocks])
    else:
      for i, blk in enumerate(blocks):
        out.update({f"{dst}/encoderblock_{i}/{sub}": v for sub, v in blk.items()})

  vc, tc = model.config.vision_config, model.config.text_config
  out["img/embedding/kernel"] = take("vision_model.embeddings.patch_embedding.weight").transpose(2, 3, 1, 0)
  out["img/embedding/bias"] = take("vision_model.embeddings.patch_embedding.bias")
  out["img/pos_embedding"] = take("vision_model.embeddings.position_embedding.weight")[None]
  encoder("img/Transformer", "vision_model.encoder", vc.num_hidden_layers, vc.num_attention_heads)
  norm("img/Transformer/encoder_norm", "vision_model.post_layernorm")
  out["img/MAPHead_0/probe"] = take("vision_model.head.probe")
  w = np.split(take("vision_model.head.attention.in_proj_weight"), 3)
  b = np.split(take("vision_model.head.attention.in_proj_bias"), 3)
  attention(
    "img/MAPHead_0/MultiHeadDotProductAttention_0",
    w,
    b,
    take("vision_model.head.attention.out_proj.weight"),
    take("vision_model.head.attention.out_proj.bias"),
    vc.num_attention_heads,
  )
  norm("img/MAPHead_0/LayerNorm_0", "vision_model.head.layernorm")
  dense("img/MAPHead_0/MlpBlock_0/Dense_0", "vision_model.head.mlp.fc1")
  dense("img/MAPHead_0/MlpBlock_0/Dense_1", "vision_model.head.mlp.fc2")
  out["txt/Embed_0/embedding"] = take("text_model.embeddings.token_embedding.weight")
  out["txt/pos_embedding"] = take("text_model.embeddings.position_embedding.weight")[None]
  encoder("txt/Encoder_0", "text_model.encoder", tc.num_hidden_layers, tc.num_attention_heads)
  norm("txt/Encoder_0/encoder_norm", "text_model.final_layer_norm")
  dense("txt/head", "text_model.head")
  out["t"] = take("logit_scale")
  out["b"] = take("logit_bias")
  assert used == set(sd), f"SiglipModel tensors not written: {sorted(set(sd) - used)}"
  return out


def _write(tmp_path, tree: dict, prefix: str = "params/", name: str = "ckpt.npz") -> str:
  path = str(tmp_path / name)
  np.savez(path, **{prefix + k: v for k, v in tree.items()})
  return path


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  pixels = rng.uniform(-1, 1, size=(3, 3, IMAGE, IMAGE)).astype(np.float32)  # NCHW, big_vision's [-1, 1]
  ids = rng.integers(2, VOCAB, size=(3, TEXT_LEN))
  for i, n in enumerate([5, 16, 9]):  # SigLIP v1 style: "sticky" EOS (1) padded with EOS to the fixed length
    ids[i, n - 1 :] = 1
  return pixels, ids


_APPLY: dict[str, Any] = {}  # one compiled apply per architecture (XLA compiles dominate on a 2-core CPU)


def _ours(path, pixels, ids, **kw):
  name, kwargs, params = import_big_vision(path, **kw)
  key = repr((name, kwargs))
  if key not in _APPLY:
    _APPLY[key] = jax.jit(build_model(name, kwargs).apply)
  zimg, ztxt, out = _APPLY[key]({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids))
  logits = out["scale"] * ztxt @ zimg.T + (out["bias"] if out["bias"] is not None else 0.0)
  return (np.asarray(zimg), np.asarray(ztxt), np.asarray(logits)), kwargs, params


def _theirs(model, pixels, ids):
  with torch.no_grad():  # no attention_mask: big_vision's text tower attends to every token
    out = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels))
  return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_text.numpy()


def _check(label, ours, theirs):
  for x, y, name in zip(ours, theirs, ("image_embeds", "text_embeds", "logits")):
    assert x.shape == y.shape, name
    diff = float(np.max(np.abs(x - y)))
    MEASURED[f"{label} {name}"] = diff
    assert diff <= TOL, f"{label} {name}: max abs diff {diff}"


@pytest.fixture(scope="module")
def siglip():
  return _make_siglip()


@pytest.fixture(scope="module", autouse=True)
def _report():
  yield
  if MEASURED:
    print("\nbig_vision import vs transformers SiglipModel, max abs diff (float32):")
    for k, v in MEASURED.items():
      print(f"  {k}: {v:.2e}")


@pytest.mark.parametrize(
  "scanned,prefix,scan",
  [(False, "params/", False), (True, "params/", False), (False, "", True), (True, "opt/target/", True)],
)
def test_parity_with_transformers(tmp_path, siglip, scanned, prefix, scan):
  path = _write(tmp_path, _bv_tree(siglip, scanned), prefix)
  pixels, ids = _inputs()
  ours, kwargs, params = _ours(path, pixels, ids, scan=scan)
  _check(
    f"{'scanned' if scanned else 'unrolled'} file, prefix {prefix!r}, scan={scan}", ours, _theirs(siglip, pixels, ids)
  )
  im, tx = kwargs["image"], kwargs["text"]
  assert (im["width"], im["depth"], im["mlp_dim"], im["num_heads"], im["patch_size"], im["posemb_grid"]) == (
    32,
    2,
    56,
    4,
    (PATCH, PATCH),
    (IMAGE // PATCH,) * 2,
  )
  assert (tx["width"], tx["depth"], tx["mlp_dim"], tx["num_heads"], tx["vocab_size"], tx["max_len"]) == (
    24,
    3,
    40,
    2,
    VOCAB,
    TEXT_LEN,
  )
  assert im["out_dim"] is None and tx["out_dim"] == 32 and kwargs["bias_init"] == -10.0
  assert tx["pool_type"] == "last" and tx["pool_mask_pad"] is False and tx["padding_mask"] is False
  assert im["mlp_act"] == tx["mlp_act"] == "gelu_tanh" and im["norm_eps"] == tx["norm_eps"] == 1e-6
  assert ("layers" in params["img"]["encoder"]) == scan and ("layers" in params["txt"]["encoder"]) == scan


def _sincos_bv(h, w, width, temperature=10_000.0):
  """big_vision/models/vit.py posemb_sincos_2d, restated in numpy."""
  y, x = np.mgrid[:h, :w]
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1))
  y, x = np.einsum("m,d->md", y.flatten(), omega), np.einsum("m,d->md", x.flatten(), omega)
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def test_sincos2d_image_posemb_is_detected_by_its_absence(tmp_path):
  model = _make_siglip(seed=1)
  g = IMAGE // PATCH
  with torch.no_grad():  # the oracle adds exactly big_vision's fixed embedding
    model.vision_model.embeddings.position_embedding.weight.copy_(torch.tensor(_sincos_bv(g, g, 32)))
  tree = _bv_tree(model, scanned=False)
  del tree["img/pos_embedding"]
  path = _write(tmp_path, tree)
  pixels, ids = _inputs(1)
  ours, kwargs, _ = _ours(path, pixels, ids)
  assert kwargs["image"]["posemb"] == "sincos2d" and "posemb_grid" not in kwargs["image"]
  _check("sincos2d image posemb", ours, _theirs(model, pixels, ids))
  with pytest.raises(ValueError, match=r"absent.*params/img/pos_embedding") as e:
    import_big_vision(path, posemb="learn")
  assert path in str(e.value)


@pytest.mark.parametrize("pool_type", ["gap", "map"])
def test_text_pool_mask_pad_option(pool_type):
  kw = dict(vocab_size=20, width=16, depth=1, mlp_dim=32, num_heads=2, max_len=6, pool_type=pool_type, pad_id=0)
  masked, full = TextTransformer(**kw), TextTransformer(**kw, pool_mask_pad=False)
  padded = jnp.array([[3, 4, 5, 0, 0, 0], [7, 8, 9, 10, 11, 0]])
  rng = np.random.default_rng(0)  # random values in the init's shapes: no compiled (slow on CPU) init
  v = jax.tree.map(
    lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.5, a.dtype),
    nn.meta.unbox(jax.eval_shape(masked.init, jax.random.key(0), padded)),
  )
  z_m, _ = jax.jit(masked.apply)(v, padded)
  z_f, aux_f = jax.jit(full.apply)(v, padded)  # same parameters: the option changes no parameter
  enc = aux_f["encoded"]
  valid = (padded != 0)[..., None]
  if pool_type == "gap":
    np.testing.assert_allclose(z_f, enc.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(z_m, (enc * valid).sum(1) / valid.sum(1), atol=1e-6)
  else:
    d = masked.dims()
    head = jax.jit(MAPHead(num_heads=d["num_heads"], mlp_dim=d["mlp_dim"], norm_eps=1e-6).apply)
    np.testing.assert_allclose(z_f, head({"params": v["params"]["MAPHead"]}, enc), atol=1e-5)
    np.testing.assert_allclose(z_m, head({"params": v["params"]["MAPHead"]}, enc, mask=valid[..., 0]), atol=1e-5)
  assert float(jnp.max(jnp.abs(z_m - z_f))) > 1e-3  # the option matters when there are pads
  unpadded = jnp.array([[3, 4, 5, 6, 7, 8]])
  # Two programs, float32 rounding apart (values ~6: 1.9e-6 seen under conftest's XLA flags).
  np.testing.assert_allclose(jax.jit(masked.apply)(v, unpadded)[0], jax.jit(full.apply)(v, unpadded)[0], atol=1e-5)


def test_text_map_head_imports_as_map_pooling_over_all_tokens(tmp_path, siglip):
  tree = _bv_tree(siglip, scanned=True)
  rng = np.random.default_rng(0)
  d, m, h = 24, 40, 2  # the text tower's width, mlp_dim, heads: big_vision's MAPHead uses the tower's
  shapes = {
    "probe": (1, 1, d),
    "LayerNorm_0/scale": (d,),
    "LayerNorm_0/bias": (d,),
    "MlpBlock_0/Dense_0/kernel": (d, m),
    "MlpBlock_0/Dense_0/bias": (m,),
    "MlpBlock_0/Dense_1/kernel": (m, d),
    "MlpBlock_0/Dense_1/bias": (d,),
    **{f"MultiHeadDotProductAttention_0/{p}/kernel": (d, h, d // h) for p in ("query", "key", "value")},
    **{f"MultiHeadDotProductAttention_0/{p}/bias": (h, d // h) for p in ("query", "key", "value")},
    "MultiHeadDotProductAttention_0/out/kernel": (h, d // h, d),
    "MultiHeadDotProductAttention_0/out/bias": (d,),
  }
  tree.update({f"txt/MAPHead_0/{k}": rng.normal(size=s).astype(np.float32) * 0.3 for k, s in shapes.items()})
  path = _write(tmp_path, tree)
  name, kwargs, params = import_big_vision(path)
  assert kwargs["text"]["pool_type"] == "map" and kwargs["text"]["pool_mask_pad"] is False
  model = build_model(name, kwargs)
  _, ids = _inputs()
  ids[:, 10:] = 0  # pad id 0 (TextTransformer's default pad_id): big_vision still pools over these
  ztxt, aux = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.encode_text))(params, jnp.asarray(ids))
  head = MAPHead(num_heads=h, mlp_dim=m, mlp_act="gelu_tanh", norm_eps=1e-6)
  want = jax.jit(head.apply)({"params": params["txt"]["MAPHead"]}, aux["encoded"])
  want = want @ params["txt"]["head"]["kernel"] + params["txt"]["head"]["bias"]
  np.testing.assert_allclose(ztxt, want / np.linalg.norm(want, axis=-1, keepdims=True), atol=1e-5)


def test_errors_name_the_key_and_the_file(tmp_path, siglip):
  tree = _bv_tree(siglip, scanned=False)
  extra = _write(tmp_path, {**tree, "img/pre_logits/kernel": np.zeros((32, 32), np.float32)}, name="extra.npz")
  with pytest.raises(ValueError, match=r"not used.*params/img/pre_logits/kernel") as e:
    import_big_vision(extra)
  assert extra in str(e.value)

  outside = _write(tmp_path, tree, name="outside.npz")
  np.savez(outside, **{f"params/{k}": v for k, v in tree.items()}, **{"opt/mu/t": np.zeros(1, np.float32)})
  with pytest.raises(ValueError, match=r"not used.*'opt/mu/t'"):
    import_big_vision(outside)

  key = "txt/Encoder_0/encoderblock_1/MlpBlock_0/Dense_1/bias"
  missing = _write(tmp_path, {k: v for k, v in tree.items() if k != key}, name="missing.npz")
  with pytest.raises(ValueError, match=rf"absent.*params/{key}") as e:
    import_big_vision(missing)
  assert missing in str(e.value)

  key = "img/Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"  # one block with another mlp_dim
  odd = _write(tmp_path, {**tree, key: np.zeros((32, 60), np.float32)}, name="odd.npz")
  with pytest.raises(ValueError, match=rf"params/{key}: shape \(32, 60\), expected \(32, 56\)") as e:
    import_big_vision(odd)
  assert odd in str(e.value)

  scanned = _bv_tree(siglip, scanned=True)
  mixed = _write(tmp_path, {**scanned, **{k: v for k, v in tree.items() if "encoderblock_0" in k}}, name="mixed.npz")
  with pytest.raises(ValueError, match="both a scanned"):
    import_big_vision(mixed)

  with pytest.raises(ValueError, match="text_pool 'max'"):
    import_big_vision(_write(tmp_path, tree, name="ok.npz"), text_pool="max")

  vit_only = _write(tmp_path, {k[len("img/") :]: v for k, v in tree.items() if k.startswith("img/")}, name="vit.npz")
  with pytest.raises(ValueError, match="not a two-tower checkpoint") as e:
    import_big_vision(vit_only)
  assert vit_only in str(e.value)


def test_bfloat16_file_and_checkpoint_load_params(tmp_path, siglip):
  """np.savez stores bfloat16 as void 'V2' (big_vision's utils.recover_dtype reads it back)."""
  import ml_dtypes

  from vlm import checkpoint

  tree = _bv_tree(siglip, scanned=False)
  path = _write(tmp_path, {k: v.astype(ml_dtypes.bfloat16) for k, v in tree.items()})
  _, _, params = import_big_vision(path)
  k = params["img"]["embedding"]["conv"]["kernel"]
  assert k.dtype == np.float32
  np.testing.assert_array_equal(k, tree["img/embedding/kernel"].astype(ml_dtypes.bfloat16).astype(np.float32))
  loaded = checkpoint.load_params(path)  # config.init.path may name an .npz
  np.testing.assert_array_equal(loaded["txt"]["head"]["kernel"], params["txt"]["head"]["kernel"])


def test_predict_on_an_npz_with_a_tokenizer(tmp_path, siglip):
  """vlm.predict on a big_vision .npz (+ --tokenizer): big_vision's eval pp resize(32)|value_range(-1, 1) on a
  32 px photo crop, SiglipTokenizer's ids, the probabilities of SiglipModel (no attention mask)."""
  import io

  import sentencepiece as spm
  from PIL import Image
  from sklearn.datasets import load_sample_images

  from vlm.predict import predict

  words = "a photo of cat dog red blue circle square the picture small large".split()
  rng = np.random.default_rng(0)
  buf = io.BytesIO()
  spm.SentencePieceTrainer.Train(
    sentence_iterator=iter([" ".join(rng.choice(words, 6)) for _ in range(400)]),
    model_writer=buf,
    vocab_size=60,
    model_type="unigram",
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    hard_vocab_limit=False,
    minloglevel=2,
    num_threads=1,
  )
  (tmp_path / "spm.model").write_bytes(buf.getvalue())
  photo = load_sample_images().images[0][100 : 100 + IMAGE, 200 : 200 + IMAGE]  # already 32 px: resize is exact
  Image.fromarray(photo).save(tmp_path / "crop.png")
  path = _write(tmp_path, _bv_tree(siglip, scanned=False))
  labels, template = ["red cat", "blue dog", "a small square"], "a photo of a {}."
  ranked = dict(
    predict(path, tmp_path / "crop.png", labels, templates=[template], tokenizer=str(tmp_path / "spm.model"))
  )
  tok = transformers.SiglipTokenizer(vocab_file=str(tmp_path / "spm.model"), model_max_length=TEXT_LEN)
  ids = tok([template.format(x) for x in labels], padding="max_length", return_tensors="pt")["input_ids"]
  pixels = torch.tensor(photo.astype(np.float32)[None].transpose(0, 3, 1, 2) / 127.5 - 1.0)
  with torch.no_grad():
    ref = torch.sigmoid(siglip(input_ids=ids, pixel_values=pixels).logits_per_image[0]).numpy()
  np.testing.assert_allclose([ranked[x] for x in labels], ref, atol=1e-4)
  assert np.ptp(ref) > 1e-3
