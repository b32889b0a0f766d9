"""Import of big_vision two-tower checkpoints (SigLIP, SigLIP 2 and LiT-style `.npz` files).

big_vision (github.com/google-research/big_vision) saves a checkpoint as an `.npz` whose keys are the
'/'-joined flax parameter paths (utils.py: `load_checkpoint_np` rebuilds the tree with `recover_tree`).
Published SigLIP / SigLIP 2 files put the tree under `params/` (`params/img/...`, `params/txt/...`,
`params/t`, `params/b`); utils.load_params also accepts the bare tree and old `opt/target/` files, and
so does this importer. The layout (models/vit.py, models/proj/image_text/{two_towers,text_transformer}.py):

    img/embedding/{kernel [p, p, C, D], bias}      the patch convolution
    img/pos_embedding [1, gh*gw, D]                absent for posemb='sincos2d' (computed, not stored)
    img/cls [1, 1, D]                              pool_type='tok' only (added after the posemb)
    img/Transformer/encoderblock_{i}/...           or encoderblock/... with a leading depth axis (scan)
    img/Transformer/encoder_norm/{scale, bias}
    img/MAPHead_0/{probe, MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}   pool_type='map'
    img/head/{kernel, bias}                        when the tower's out_dim is set
    txt/Embed_0/embedding [V, D], txt/pos_embedding [1, L, D]
    txt/Encoder_0/encoderblock_{i}/... (or encoderblock/...), txt/Encoder_0/encoder_norm
    txt/MAPHead_0/...                              text pool_type='map' only
    txt/head/{kernel, bias}
    t [1] (log temperature), b [1] (bias; only with bias_init)

Each encoder block: LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value}/{kernel [D, h, hd],
bias [h, hd]}, out/{kernel [h, hd, D], bias [D]}, LayerNorm_1, MlpBlock_0/Dense_{0,1}/{kernel, bias}.
transformers' models/siglip/convert_siglip_to_hf.py maps exactly this tree onto SiglipModel (splitting
`encoderblock/` along its first axis for the scanned SigLIP 2 files); tests/test_big_vision.py writes
the inverse of that mapping and checks the import against SiglipModel.

Facts fixed by big_vision's code rather than stored in the file:
- MLP activation: flax `nn.gelu`, whose default is the tanh approximation (vit.py MlpBlock) -> 'gelu_tanh'.
- LayerNorm epsilon: flax's default 1e-6 (vit.py `nn.LayerNorm()` everywhere).
- Pre-norm blocks, a final `encoder_norm`, bidirectional text attention, no attention mask anywhere
  (text_transformer.py calls vit.Encoder without one), and pooling over every token, pads included
  (text 'gap' is `x.mean(axis=1)`, 'map' a MAPHead over all tokens) -> TextTransformer.pool_mask_pad=False.
- Text pooling is a model option, not a parameter: text_transformer.py's default 'last' is what SigLIP
  and SigLIP 2 use ("sticky" EOS: the last token is EOS or padding); other values via `text_pool`.
- SigLIP 2 (non-NaFlex) files are the same tree with a 256k (Gemma tokenizer) vocabulary; big_vision's
  README_siglip2.md: "The only difference is the vocab size (256k) and the tokenizer". The g-opt
  image tower is paired with a So400m text tower whose `head` maps 1152 -> 1536. NaFlex checkpoints
  (proj/image_text/naflex_vit.py) are a different ViT and are rejected by their keys.
Inputs are what big_vision feeds: images in [-1, 1] (`value_range(-1, 1)`), fixed-length token ids.
"""

from pathlib import Path
from typing import Any

import numpy as np

from vlm.tree import flatten, unflatten

BIG_VISION_NORM_EPS = 1e-6  # flax nn.LayerNorm default (big_vision/models/vit.py)
BIG_VISION_MLP_ACT = "gelu_tanh"  # flax nn.gelu default approximate=True (big_vision/models/vit.py MlpBlock)

_BLOCK = {  # big_vision encoder block sub-path -> ours
  "LayerNorm_0/scale": "norm1/scale",
  "LayerNorm_0/bias": "norm1/bias",
  "LayerNorm_1/scale": "norm2/scale",
  "LayerNorm_1/bias": "norm2/bias",
  **{
    f"MultiHeadDotProductAttention_0/{p}/{w}": f"attn/{p}/{w}"
    for p in ("query", "key", "value", "out")
    for w in ("kernel", "bias")
  },
  "MlpBlock_0/Dense_0/kernel": "mlp/fc1/kernel",
  "MlpBlock_0/Dense_0/bias": "mlp/fc1/bias",
  "MlpBlock_0/Dense_1/kernel": "mlp/fc2/kernel",
  "MlpBlock_0/Dense_1/bias": "mlp/fc2/bias",
}
_MAP_HEAD = {
  "probe": "probe",
  "LayerNorm_0/scale": "norm/scale",
  "LayerNorm_0/bias": "norm/bias",
  **{
    f"MultiHeadDotProductAttention_0/{p}/{w}": f"attn/{p}/{w}"
    for p in ("query", "key", "value", "out")
    for w in ("kernel", "bias")
  },
  "MlpBlock_0/Dense_0/kernel": "mlp/fc1/kernel",
  "MlpBlock_0/Dense_0/bias": "mlp/fc1/bias",
  "MlpBlock_0/Dense_1/kernel": "mlp/fc2/kernel",
  "MlpBlock_0/Dense_1/bias": "mlp/fc2/bias",
}
_PREFIXES = ("params/", "opt/target/")  # big_vision utils.load_params: checkpoint["params"] or ["opt"]["target"]
TEXT_POOLS = {"last": "last", "first": "first", "gap": "gap", "mean": "gap", "map": "map"}
IMAGE_POOLS = {"map": "map", "gap": "gap", "tok": "cls", "cls": "cls", "none": "none"}


def load_big_vision_npz(path: str | Path) -> tuple[dict[str, np.ndarray], str, list[str]]:
  """The file's arrays as float32 keyed by path below the params prefix, the prefix ('params/',
  'opt/target/' or ''), and the keys outside it (for the unused-key error). Never unpickles; bfloat16
  arrays (which np.savez stores as void 'V2') are recovered as big_vision's utils.recover_dtype does."""
  import ml_dtypes

  with np.load(path, allow_pickle=False) as npz:
    if not hasattr(npz, "files"):
      raise ValueError(f"{path}: not an .npz archive of named arrays (np.savez)")
    keys = list(npz.files)
    prefix = next((p for p in _PREFIXES if any(k.startswith(p) for k in keys)), "")
    outside = sorted(k for k in keys if not k.startswith(prefix))
    arrays = {}
    for k in keys:
      if not k.startswith(prefix):
        continue
      a = npz[k]
      if a.dtype.kind == "V" and a.dtype.itemsize == 2:
        a = a.view(ml_dtypes.bfloat16)
      if not (np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16):
        raise ValueError(f"{path}: key {k!r} has dtype {a.dtype}, not a float parameter")
      arrays[k[len(prefix) :]] = np.asarray(a, np.float32)
  return arrays, prefix, outside


class _Reader:
  """Takes arrays out of the flat dict, remembering which keys were used and which were absent."""

  def __init__(self, arrays: dict[str, np.ndarray], prefix: str, path: str):
    self.arrays, self.prefix, self.path = arrays, prefix, path
    self.used: set[str] = set()
    self.missing: list[str] = []
    self.source: dict[str, str] = {}  # our path -> the file's key, for shape errors

  def has(self, key: str) -> bool:
    return key in self.arrays

  def get(self, key: str) -> np.ndarray | None:
    if key not in self.arrays:
      self.missing.append(self.prefix + key)
      return None
    self.used.add(key)
    return self.arrays[key]

  def shape(self, key: str, ndim: int) -> tuple[int, ...]:
    """The shape of a key needed to infer the architecture; a clear error if absent or odd."""
    if key not in self.arrays:
      raise ValueError(f"{self.path}: key {self.prefix + key!r} is absent; it is needed to infer the architecture")
    shape = self.arrays[key].shape
    if len(shape) != ndim:
      raise ValueError(f"{self.path}: key {self.prefix + key!r} has shape {shape}; expected {ndim} dimensions")
    return shape

  def put(self, out: dict, ours: str, key: str, fn=None) -> None:
    a = self.get(key)
    if a is not None:
      out[ours] = fn(a) if fn else a
      self.source[ours] = self.prefix + key


def _encoder_layout(r: _Reader, base: str) -> tuple[bool, int]:
  """(scanned, depth) of the encoder under `base` ('img/Transformer' or 'txt/Encoder_0')."""
  scanned = any(k.startswith(f"{base}/encoderblock/") for k in r.arrays)
  idx = set()
  for k in r.arrays:
    if k.startswith(f"{base}/encoderblock_"):
      head = k[len(f"{base}/encoderblock_") :].split("/", 1)[0]
      if head.isdigit():
        idx.add(int(head))
  if scanned and idx:
    raise ValueError(
      f"{r.path}: {r.prefix}{base} holds both a scanned 'encoderblock/' and unrolled 'encoderblock_{{i}}/' blocks"
    )
  if scanned:
    return True, r.shape(f"{base}/encoderblock/LayerNorm_0/scale", 2)[0]
  if not idx:
    raise ValueError(
      f"{r.path}: no encoder blocks under {r.prefix}{base}/ (expected 'encoderblock_0/...' "
      f"or a scanned 'encoderblock/...')"
    )
  return False, max(idx) + 1


def _encoder(r: _Reader, base: str, ours: str, scan: bool) -> tuple[dict, dict[str, int]]:
  """Our encoder params (`{ours}/block_{i}/...` or `{ours}/layers/...`) and the block sizes."""
  scanned, depth = _encoder_layout(r, base)
  q = f"{base}/encoderblock/" if scanned else f"{base}/encoderblock_0/"
  qshape = r.shape(q + "MultiHeadDotProductAttention_0/query/kernel", 4 if scanned else 3)[-3:]
  mshape = r.shape(q + "MlpBlock_0/Dense_0/kernel", 3 if scanned else 2)[-2:]
  width, heads, hd = qshape
  if heads * hd != width:
    raise ValueError(
      f"{r.path}: key {r.prefix + q}MultiHeadDotProductAttention_0/query/kernel has shape "
      f"{qshape}: heads x head_dim != width is not supported"
    )
  out = {}
  for sub, mine in _BLOCK.items():
    if scanned:
      key = f"{base}/encoderblock/{sub}"
      a = r.get(key)
      if a is None:
        continue
      if a.shape[0] != depth:
        raise ValueError(
          f"{r.path}: key {r.prefix + key!r} has shape {a.shape}; the scanned encoder has depth {depth} on axis 0"
        )
      if scan:
        out[f"{ours}/layers/{mine}"] = a
        r.source[f"{ours}/layers/{mine}"] = r.prefix + key
      else:
        for i in range(depth):
          out[f"{ours}/block_{i}/{mine}"] = a[i]
          r.source[f"{ours}/block_{i}/{mine}"] = f"{r.prefix}{key}[{i}]"
    else:
      keys = [f"{base}/encoderblock_{i}/{sub}" for i in range(depth)]
      layers = [r.get(k) for k in keys]
      if scan:
        if all(a is not None for a in layers):
          shapes = {a.shape for a in layers}
          if len(shapes) > 1:
            raise ValueError(
              f"{r.path}: keys {[r.prefix + k for k in keys]} differ in shape: {[a.shape for a in layers]}"
            )
          out[f"{ours}/layers/{mine}"] = np.stack(layers)
          r.source[f"{ours}/layers/{mine}"] = r.prefix + keys[0].replace("encoderblock_0", "encoderblock_{i}")
      else:
        for i, (k, a) in enumerate(zip(keys, layers)):
          if a is not None:
            out[f"{ours}/block_{i}/{mine}"] = a
            r.source[f"{ours}/block_{i}/{mine}"] = r.prefix + k
  return out, dict(width=width, depth=depth, mlp_dim=mshape[1], num_heads=heads)


def _map_head(r: _Reader, base: str, ours: str) -> dict:
  out = {}
  for sub, mine in _MAP_HEAD.items():
    r.put(out, f"{ours}/{mine}", f"{base}/{sub}")
  return out


def _grid(n: int, key: str, path: str, posemb_grid) -> tuple[int, int]:
  if posemb_grid is not None:
    grid = tuple(int(g) for g in posemb_grid)
    if grid[0] * grid[1] != n:
      raise ValueError(f"{path}: key {key!r} holds {n} positions, not posemb_grid={grid}")
    return grid
  g = int(round(n**0.5))
  if g * g != n:
    raise ValueError(f"{path}: key {key!r} holds {n} positions, not a square grid; pass posemb_grid=(h, w)")
  return g, g


def import_big_vision(
  path: str | Path,
  *,
  scan: bool = False,
  posemb: str | None = None,
  posemb_grid: tuple[int, int] | None = None,
  text_pool: str | None = None,
  image_pool: str | None = None,
) -> tuple[str, dict[str, Any], dict]:
  """A big_vision two-tower `.npz` (SigLIP, SigLIP 2, LiT-style) -> ('two_tower', model kwargs, params).

  Sizes (width, depth, mlp_dim, heads, patch size, position grid, vocabulary, text length, output
  dims) come from the tensor shapes, for unrolled (`encoderblock_{i}`) and scanned (`encoderblock`,
  leading depth axis) files alike; `scan` picks our layout (`encoder/layers/...`) independently.
  posemb: the image position embedding, 'learn' or 'sincos2d' (not stored); None: 'learn' if the file
  has img/pos_embedding, else 'sincos2d'. posemb_grid: the learned grid (h, w); None: a square grid.
  text_pool: 'last' (big_vision's default, SigLIP's and SigLIP 2's), 'first', 'gap' ('mean') or 'map';
  None: 'map' if the file has txt/MAPHead_0, else 'last'. image_pool: 'map', 'gap', 'tok' (class token)
  or 'none'; None: 'map' with img/MAPHead_0, 'tok' with img/cls, else 'gap' (big_vision's ViT default).
  Raises ValueError naming the file and the keys when one is unused, absent or of an unexpected shape.
  """
  path_s = str(path)
  arrays, prefix, outside = load_big_vision_npz(path)
  r = _Reader(arrays, prefix, path_s)
  if not any(k.startswith("img/") for k in arrays) or not any(k.startswith("txt/") for k in arrays):
    raise ValueError(
      f"{path_s}: not a two-tower checkpoint: no {prefix}img/... and {prefix}txt/... keys "
      f"(top-level keys: {sorted({k.split('/')[0] for k in arrays})[:20]})"
    )
  flat: dict[str, np.ndarray] = {}

  # Image tower (big_vision/models/vit.py _Model).
  kshape = r.shape("img/embedding/kernel", 4)
  patch, channels = (kshape[0], kshape[1]), kshape[2]
  enc, idims = _encoder(r, "img/Transformer", "img/encoder", scan)
  flat.update(enc)
  r.put(flat, "img/embedding/conv/kernel", "img/embedding/kernel")
  r.put(flat, "img/embedding/conv/bias", "img/embedding/bias")
  has_cls = r.has("img/cls")
  if image_pool is None:
    image_pool = "map" if any(k.startswith("img/MAPHead_0/") for k in arrays) else ("tok" if has_cls else "gap")
  if image_pool not in IMAGE_POOLS:
    raise ValueError(f"image_pool {image_pool!r} is not supported; known: {sorted(IMAGE_POOLS)}")
  vit_pool = IMAGE_POOLS[image_pool]
  if vit_pool == "cls":
    r.put(flat, "img/cls", "img/cls")
  if posemb is None:
    posemb = "learn" if r.has("img/pos_embedding") else "sincos2d"
  if posemb not in ("learn", "sincos2d"):
    raise ValueError(f"posemb {posemb!r} is not supported; known: 'learn', 'sincos2d'")
  grid = None
  if posemb == "learn":
    pe = r.get("img/pos_embedding")
    if pe is not None:
      if pe.ndim != 3 or pe.shape[0] != 1:
        raise ValueError(f"{path_s}: key {prefix}img/pos_embedding has shape {pe.shape}; expected [1, N, D]")
      grid = _grid(pe.shape[1], prefix + "img/pos_embedding", path_s, posemb_grid)
      if vit_pool == "cls":  # big_vision adds the posemb before prepending cls (vit.py); ours after
        pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
      flat["img/pos_embedding/pos_embedding"] = pe
      r.source["img/pos_embedding/pos_embedding"] = prefix + "img/pos_embedding"
  r.put(flat, "img/encoder_norm/scale", "img/Transformer/encoder_norm/scale")
  r.put(flat, "img/encoder_norm/bias", "img/Transformer/encoder_norm/bias")
  if vit_pool == "map":
    flat.update(_map_head(r, "img/MAPHead_0", "img/MAPHead"))
  img_out = None
  if r.has("img/head/kernel"):
    img_out = r.shape("img/head/kernel", 2)[1]
    r.put(flat, "img/head/kernel", "img/head/kernel")
    r.put(flat, "img/head/bias", "img/head/bias")
  image = dict(
    idims,
    patch_size=patch,
    posemb=posemb,
    class_token=vit_pool == "cls",
    pool_type=vit_pool,
    out_dim=img_out,
    head_bias=True,
    mlp_act=BIG_VISION_MLP_ACT,
    norm_eps=BIG_VISION_NORM_EPS,
  )
  if grid is not None:
    image["posemb_grid"] = grid

  # Text tower (big_vision/models/proj/image_text/text_transformer.py _Model).
  vocab, twidth = r.shape("txt/Embed_0/embedding", 2)
  max_len = r.shape("txt/pos_embedding", 3)[1]
  enc, tdims = _encoder(r, "txt/Encoder_0", "txt/encoder", scan)
  flat.update(enc)
  r.put(flat, "txt/embedding/embedding", "txt/Embed_0/embedding")
  r.put(flat, "txt/pos_embedding/pos_embedding", "txt/pos_embedding")
  r.put(flat, "txt/encoder_norm/scale", "txt/Encoder_0/encoder_norm/scale")
  r.put(flat, "txt/encoder_norm/bias", "txt/Encoder_0/encoder_norm/bias")
  if text_pool is None:
    text_pool = "map" if any(k.startswith("txt/MAPHead_0/") for k in arrays) else "last"
  if text_pool not in TEXT_POOLS:
    raise ValueError(
      f"text_pool {text_pool!r} is not supported; known: {sorted(TEXT_POOLS)} "
      "(big_vision's 'max'/'gmp' has no counterpart here)"
    )
  if TEXT_POOLS[text_pool] == "map":
    flat.update(_map_head(r, "txt/MAPHead_0", "txt/MAPHead"))
  txt_out = None
  if r.has("txt/head/kernel"):
    txt_out = r.shape("txt/head/kernel", 2)[1]
    r.put(flat, "txt/head/kernel", "txt/head/kernel")
    r.put(flat, "txt/head/bias", "txt/head/bias")
  text = dict(
    tdims,
    vocab_size=vocab,
    max_len=max_len,
    causal=False,
    pool_type=TEXT_POOLS[text_pool],
    padding_mask=False,
    pool_mask_pad=False,
    out_dim=txt_out,
    head_bias=True,
    mlp_act=BIG_VISION_MLP_ACT,
    norm_eps=BIG_VISION_NORM_EPS,
  )
  if twidth != tdims["width"]:
    raise ValueError(
      f"{path_s}: key {prefix}txt/Embed_0/embedding has width {twidth}, the text encoder {tdims['width']}"
    )

  # Temperature and bias (two_towers.py: t = log(temperature_init), scale = exp(t); b only with bias_init).
  r.put(flat, "t", "t", lambda a: a.reshape(1))
  has_bias = r.has("b")
  if has_bias:
    r.put(flat, "b", "b", lambda a: a.reshape(1))

  unused = sorted(prefix + k for k in set(arrays) - r.used) + outside
  if r.missing:
    raise ValueError(
      f"{path_s}: keys expected for this big_vision two-tower layout but absent: {sorted(set(r.missing))[:20]}"
    )
  if unused:
    raise ValueError(f"{path_s}: keys not used by the importer (unsupported layout or option?): {unused[:20]}")
  ei = img_out or idims["width"]
  et = txt_out or tdims["width"]
  if ei != et:
    raise ValueError(f"{path_s}: image embeddings have {ei} dims, text embeddings {et}: no common space")

  kwargs = dict(
    image=image, text=text, temperature_init=float(np.log(10.0)), bias_init=-10.0 if has_bias else None, max_scale=None
  )
  if scan:
    kwargs["image"]["scan"] = kwargs["text"]["scan"] = True
  _check_shapes(kwargs, flat, r.source, path_s, patch, channels, grid, max_len)
  params = unflatten(flat)
  return "two_tower", kwargs, params


def _check_shapes(
  kwargs: dict,
  flat: dict[str, np.ndarray],
  source: dict[str, str],
  path: str,
  patch: tuple[int, int],
  channels: int,
  grid,
  max_len: int,
) -> None:
  """Every imported array has the shape our TwoTower gives that parameter (abstract init, no compute)."""
  import jax
  import jax.numpy as jnp
  import flax.linen as nn

  from vlm.models.two_tower import TwoTower

  gh, gw = grid or (2, 2)
  images = jax.ShapeDtypeStruct((1, gh * patch[0], gw * patch[1], channels), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, max_len), jnp.int32)
  model = TwoTower(**kwargs)
  try:
    shapes = jax.eval_shape(lambda x, t: nn.meta.unbox(model.init(jax.random.key(0), x, t)["params"]), images, tokens)
  except Exception as e:  # noqa: BLE001  (an architecture our model cannot build from these sizes)
    raise ValueError(f"{path}: the inferred architecture does not build ({e}); kwargs {kwargs}") from e
  want = {k: tuple(v.shape) for k, v in flatten(shapes, unbox=False).items()}
  bad = [
    f"{source.get(k, k)}: shape {tuple(v.shape)}, expected {want[k]}"
    for k, v in flat.items()
    if k in want and tuple(v.shape) != want[k]
  ]
  extra = [source.get(k, k) for k in flat if k not in want]
  absent = [k for k in want if k not in flat]
  problems = bad + [f"{e}: no such parameter" for e in extra] + [f"{a}: not in the file" for a in absent]
  if problems:
    raise ValueError(f"{path}: the checkpoint does not fit the inferred architecture: {problems[:20]}")
