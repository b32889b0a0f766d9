"""Image preprocessing against transformers' reference image processors, on real photographs.

Oracles: the PIL-backend processors of transformers 5 (CLIPImageProcessorPil, SiglipImageProcessorPil,
BlipImageProcessorPil, LlavaImageProcessorPil(do_pad=True), IdeficsImageProcessorPil,
ChameleonImageProcessorPil, LlavaNextImageProcessorPil; `AutoImageProcessor` returns these when
torchvision is not installed) and their building blocks (image_transforms.resize / center_crop /
get_resize_output_image_size). The photos are scikit-learn's sample images (china.jpg and flower.jpg,
427 x 640), whole and cropped to odd, non-square sizes. Differences are printed in units of one
uint8 level (1/255 of the [0, 1] range): normalised values are compared as (ours - ref) * std * 255.
The torchvision ("fast") processors, transformers 5's default when torchvision is importable, are
compared where torchvision is installed (not a test dependency): they are not PIL, and differ by
a level or two.
"""

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

from PIL import Image  # noqa: E402

from vlm.data import preprocess  # noqa: E402
from vlm.data.preprocess import REFERENCE_PP, STATS, apply_ops, parse_pp, reference_pp  # noqa: E402

CLIP_STD = STATS["clip"][1]


@pytest.fixture(scope="module")
def photos():
  from sklearn.datasets import load_sample_images

  china, flower = load_sample_images().images  # 427 x 640 x 3 uint8
  assert china.shape == flower.shape == (427, 640, 3)
  return {
    "china": china,
    "flower": flower,
    "china_333x500": china[40:373, 70:570],  # non-square crop: the long side truncates
    "flower_201x150": flower[100:301, 10:160],  # odd and portrait
    "flower_97x131": flower[5:102, 300:431],  # smaller than every crop: resized up
  }


def _ours(pp, img):
  return apply_ops(parse_pp(pp), {"image": img}, np.random.default_rng(0))["image"]


def _ref(proc, img):
  out = proc(images=Image.fromarray(img), return_tensors="np")
  out = out if isinstance(out, np.ndarray) else out["pixel_values"]  # IDEFICS returns the array
  out = out[0]
  return np.moveaxis(np.asarray(out), 0, -1)  # CHW -> HWC


def _levels(ours, ref, std):
  """Max |ours - ref| in uint8 levels, normalised values scaled back by std."""
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours.astype(np.float64) - ref) * np.asarray(std, np.float64)) * 255)


def _processors(fast: bool):
  """(name, processor, our pp, std) for each reference recipe."""
  import transformers as T

  suffix = "" if fast else "Pil"
  get = lambda name: getattr(T, name + suffix)  # noqa: E731
  rows = [
    ("clip", get("CLIPImageProcessor")(), "decode|" + reference_pp("clip", 224), CLIP_STD),
    ("siglip", get("SiglipImageProcessor")(), "decode|" + reference_pp("siglip", 224), STATS["siglip"][1]),
    (
      "blip2",
      get("BlipImageProcessor")(size={"height": 224, "width": 224}),
      "decode|" + reference_pp("blip", 224),
      CLIP_STD,
    ),
    (
      "llava15",
      get("LlavaImageProcessor")(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=True),
      "decode|" + reference_pp("llava", 336),
      CLIP_STD,
    ),
    ("idefics", get("IdeficsImageProcessor")(), "decode|" + reference_pp("blip", 224), CLIP_STD),
  ]
  if not fast:
    rows.append(("chameleon", T.ChameleonImageProcessorPil(), "decode|" + reference_pp("chameleon", 512), (1, 1, 1)))
  return rows


@pytest.mark.parametrize("name", ["clip", "siglip", "blip2", "llava15", "idefics", "chameleon"])
def test_recipes_match_pil_processors(photos, name):
  ((_, proc, pp, std),) = [r for r in _processors(fast=False) if r[0] == name]
  assert proc.backend == "pil"
  diffs = {k: _levels(_ours(pp, img), _ref(proc, img), std) for k, img in photos.items()}
  print(f"\n{name} vs {type(proc).__name__}: max |diff| in 1/255 levels: {diffs}")
  assert max(diffs.values()) <= 1.0 + 1e-4, diffs  # measured: 0 (bit-exact float32) for every recipe


def test_recipes_vs_torchvision_processors(photos):
  """transformers 5's default (fast) processors: torchvision's resize, not PIL's; measured <= 2 levels."""
  pytest.importorskip("torchvision")
  for name, proc, pp, std in _processors(fast=True):
    assert proc.backend == "torchvision"
    diffs = {k: _levels(_ours(pp, img), _ref(proc, img), std) for k, img in photos.items()}
    print(f"\n{name} vs {type(proc).__name__} (torchvision): max |diff| in levels: {diffs}")
    assert max(diffs.values()) <= 2.0 + 1e-3, (name, diffs)


def test_old_bilinear_pipelines_are_far_from_the_reference(photos):
  """The filter, the shortest-side resize and the truncation each matter (so the parity tests can fail)."""
  from transformers import CLIPImageProcessorPil

  proc = CLIPImageProcessorPil()
  china = photos["china"]
  ref = _ref(proc, china)
  squash = _levels(_ours("decode|resize(224)|normalize('clip')", china), ref, CLIP_STD)
  bilinear = _levels(_ours("decode|resize_small(224)|center_crop(224)|normalize('clip')", china), ref, CLIP_STD)
  # The old resize_small rounded the long side: 427 x 640 -> 224 x 336 instead of 224 x 335.
  rounded = _levels(
    _ours("decode|resize((224, 336), method='bicubic')|center_crop(224)|normalize('clip')", china), ref, CLIP_STD
  )
  print(
    f"\nvs CLIPImageProcessorPil, levels: squashed bilinear {squash:.1f}, shortest-side bilinear "
    f"{bilinear:.1f}, bicubic with the long side rounded {rounded:.1f}"
  )
  assert squash > 100 and bilinear > 10 and rounded > 10  # measured 222, 26, 124


def test_resize_small_truncates_like_transformers():
  from transformers.image_transforms import get_resize_output_image_size

  rng = np.random.default_rng(0)
  sizes = [(427, 640), (640, 427), (333, 500), (500, 333), (224, 224), (97, 131), (1, 7), (7, 1)]
  sizes += [tuple(int(v) for v in rng.integers(1, 2000, 2)) for _ in range(300)]
  for hw in sizes:
    for size in (224, 336, 17):
      want = get_resize_output_image_size(
        np.zeros(hw + (3,), np.uint8), size, default_to_square=False, input_data_format="channels_last"
      )
      assert preprocess.resize_small_hw(hw, size) == tuple(want), (hw, size)
      want = get_resize_output_image_size(
        np.zeros(hw + (3,), np.uint8),
        size,
        default_to_square=False,
        max_size=size * 2 + 1,
        input_data_format="channels_last",
      )
      assert preprocess.resize_small_hw(hw, size, size * 2 + 1) == tuple(want), (hw, size)
  assert preprocess.resize_small_hw((427, 640), 224) == (224, 335)
  out = _ours("resize_small(224, method='bicubic')", np.zeros((427, 640, 3), np.uint8))
  assert out.shape == (224, 335, 3)


@pytest.mark.parametrize("method", ["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"])
def test_resize_filters_match_transformers_resize(photos, method):
  from transformers.image_transforms import resize
  from transformers.image_utils import PILImageResampling

  img = photos["china_333x500"]
  outs = []
  for hw in ((97, 131), (517, 601), (224, 224)):
    want = resize(img, hw, resample=getattr(PILImageResampling, method.upper()), input_data_format="channels_last")
    got = _ours(f"resize({hw}, method={method!r})", img)
    np.testing.assert_array_equal(got, want)
    outs.append(got)
  if method != "bilinear":  # the option is live: another filter gives other pixels
    assert np.abs(outs[0].astype(int) - _ours(f"resize({(97, 131)})", img)).max() > 5


@pytest.mark.parametrize(
  "hw,crop",
  [
    ((427, 640), (224, 224)),
    ((333, 500), (224, 224)),
    ((201, 150), (224, 224)),
    ((97, 131), (224, 224)),
    ((225, 226), (224, 224)),
    ((300, 200), (224, 224)),
    ((150, 301), (224, 224)),
    ((223, 500), (224, 100)),
    ((5, 3), (8, 7)),
  ],
)
def test_center_crop_matches_transformers(photos, hw, crop):
  """Offsets rounded down, padding's odd pixel at the top / left; boxes follow the crop."""
  from transformers import CLIPImageProcessorPil
  from transformers.image_transforms import center_crop

  img = photos["china"][: hw[0], : hw[1]]
  want = center_crop(img, crop, input_data_format="channels_last")
  ex = apply_ops(
    parse_pp(f"center_crop({crop})"),
    {"image": img, "boxes": np.array([[0, 0, hw[1], hw[0]]], np.float32)},
    np.random.default_rng(0),
  )
  np.testing.assert_array_equal(ex["image"], want)
  # The processor itself (no resize): the same pixels.
  proc = CLIPImageProcessorPil(
    do_resize=False, do_rescale=False, do_normalize=False, crop_size={"height": crop[0], "width": crop[1]}
  )
  np.testing.assert_array_equal(ex["image"], _ref(proc, img))
  # The box of the whole image is where the image's pixels are in the output (clipped to it).
  x0, y0, x1, y1 = ex["boxes"][0].astype(int)
  nz_rows = np.nonzero(want.any(axis=(1, 2)))[0]
  nz_cols = np.nonzero(want.any(axis=(0, 2)))[0]
  assert (y0, y1 - 1, x0, x1 - 1) == (nz_rows[0], nz_rows[-1], nz_cols[0], nz_cols[-1])


@pytest.mark.parametrize("hw", [(427, 640), (201, 150), (150, 201), (333, 332), (64, 64)])
def test_pad_to_square_matches_llava(photos, hw):
  from transformers import LlavaImageProcessorPil

  img = photos["flower"][: hw[0], : hw[1]]
  fill = tuple(int(x * 255) for x in STATS["clip"][0])  # LLaVA: tuple(int(x*255) for x in image_mean)
  assert fill == (122, 116, 104)
  want = np.moveaxis(LlavaImageProcessorPil().pad_to_square(np.moveaxis(img, -1, 0), background_color=fill), 0, -1)
  n = max(hw)
  ex = apply_ops(
    parse_pp("pad_to_square('clip')"),
    {"image": img, "boxes": np.array([[1, 2, 3, 4]], np.float32)},
    np.random.default_rng(0),
  )
  np.testing.assert_array_equal(ex["image"], want)
  assert ex["image"].shape == (n, n, 3)
  top, left = (n - hw[0]) // 2, (n - hw[1]) // 2
  np.testing.assert_array_equal(ex["boxes"], [[1 + left, 2 + top, 3 + left, 4 + top]])
  np.testing.assert_array_equal(_ours("pad_to_square((122, 116, 104))", img), want)
  if hw[0] != hw[1]:
    assert not np.array_equal(_ours("pad_to_square(0)", img), want)


def test_rescale_and_normalize_match_transformers(photos):
  from transformers.image_transforms import normalize, rescale

  img = photos["flower_201x150"]
  want = normalize(
    rescale(img, 1 / 255, input_data_format="channels_last"),
    STATS["clip"][0],
    STATS["clip"][1],
    input_data_format="channels_last",
  )
  assert want.dtype == np.float32
  for pp in (
    "rescale|normalize('clip')",
    "normalize('clip')",
    "normalize()",
    f"rescale|normalize(mean={STATS['clip'][0]}, std={STATS['clip'][1]})",
  ):
    got = _ours(pp, img)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want, err_msg=pp)
  np.testing.assert_array_equal(_ours("normalize('inception')", img), _ours("normalize(mean=0.5, std=0.5)", img))
  np.testing.assert_array_equal(_ours("rescale", img), rescale(img, 1 / 255, input_data_format="channels_last"))
  np.testing.assert_allclose(_ours("normalize('siglip')", img), _ours("value_range(-1, 1)", img), atol=1e-6)
  assert np.abs(_ours("normalize('imagenet')", img) - _ours("normalize('clip')", img)).max() > 0.05
  with pytest.raises(ValueError, match="rescale needs uint8"):
    _ours("rescale|rescale", img)


def test_bad_arguments_fail_when_parsed():
  for spec, match in [
    ("resize(224, method='bicubc')", "method must be one of"),
    ("resize_small(224, method='cubic')", "method must be one of"),
    ("resize_small(224, max_size=200)", "max_size"),
    ("random_resized_crop(224, method='area')", "method must be one of"),
    ("normalize('openai')", "stats must be one of"),
    ("normalize('clip', mean=0.5, std=0.5)", "either named stats"),
    ("normalize(mean=0.5)", "either named stats"),
    ("normalize(mean=(0.5, 0.5), std=(0.5,))", "same length"),
    ("pad_to_square(256)", "fill must be"),
    ("pad_to_square('red')", "fill must be"),
    ("rescale(0)", "factor"),
  ]:
    with pytest.raises(ValueError, match=match):
      parse_pp(spec, "data.pp_eval")
  with pytest.raises(ValueError, match="before rescale"):
    _ours("rescale|center_crop(4)", np.zeros((8, 8, 3), np.uint8))


def test_llava_next_views_normalised_match_processor(photos):
  """anyres(...)|normalize('clip') = LlavaNextImageProcessorPil with its rescale and normalisation."""
  from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
  from vlm.data.anyres import LLAVA_NEXT_PINPOINTS

  proc = LlavaNextImageProcessorPil(
    size={"shortest_edge": 336},
    crop_size={"height": 336, "width": 336},
    image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS],
  )
  points = [list(p) for p in LLAVA_NEXT_PINPOINTS]
  for key in ("china", "flower_201x150"):
    img = photos[key]
    want = np.moveaxis(proc(images=Image.fromarray(img), return_tensors="np")["pixel_values"][0], 1, -1)
    got = _ours(f"decode|anyres({points}, 336, 24)|rescale|normalize('clip')", img)
    d = _levels(got[: len(want)], want, CLIP_STD)
    print(f"\nllava_next {key}: {len(want)} views, max |diff| {d} levels")
    assert d <= 1.0 + 1e-4


def test_reference_recipes_in_full_configs():
  """The full recipes' pp_eval are the reference processors' strings (the demos are unchanged)."""
  import importlib

  want = {
    "clip_b16": reference_pp("clip", 224),
    "siglip_b16": reference_pp("siglip", 224),
    "lit_b16": reference_pp("siglip", 224),
    "blip2_stage1": reference_pp("blip", 224),
    "blip2_stage2": reference_pp("blip", 224),
    "llava_stage1": reference_pp("clip", 336),
    "llava_stage2": reference_pp("llava", 336),
    "grounding": reference_pp("llava", 336),
    "flamingo": reference_pp("blip", 224),
    "qwen_vl": reference_pp("blip", 448),
    "monkey": reference_pp("blip", 896),
  }
  for name, pp in want.items():
    c = importlib.import_module(f"configs.{name}").get_config(None)
    assert c.data.pp_eval == "decode|" + pp, (name, c.data.pp_eval)
    parse_pp(c.data.pp_train, f"{name}.data.pp_train")
  c = importlib.import_module("configs.blip2_stage2").get_config("minigpt4")
  assert c.data.pp_eval == "decode|" + reference_pp("blip", 224)
  # LLaVA-1.5 pretrains without the padding (scripts/v1_5/pretrain.sh has no --image_aspect_ratio pad).
  for name in ("llava_stage1", "llava_stage2", "grounding", "siglip_b16", "qwen_vl", "monkey", "flamingo"):
    c = importlib.import_module(f"configs.{name}").get_config(None)
    assert c.data.pp_train == c.data.pp_eval, name
  nxt = importlib.import_module("configs.llava_next").get_config(None).data.pp_eval
  assert nxt.endswith("|rescale|normalize('clip')") and "anyres(" in nxt
  for name, demo in (("clip_b16", "demo"), ("siglip_b16", "demo"), ("llava_stage2", "demo")):
    assert "bicubic" not in importlib.import_module(f"configs.{name}").get_config(demo).data.pp_eval
  assert set(REFERENCE_PP) == {"clip", "siglip", "blip", "llava", "chameleon"}


def test_frames_follow_the_image(photos):
  img = photos["flower_201x150"]
  frames = np.stack([img, img[::-1]])
  pp = "decode|" + reference_pp("llava", 64)
  ex = apply_ops(parse_pp(pp), {"image": img, "frames": frames}, np.random.default_rng(0))
  assert ex["frames"].shape == (2, 64, 64, 3) and ex["frames"].dtype == np.float32
  np.testing.assert_array_equal(ex["frames"][0], ex["image"])
  np.testing.assert_array_equal(ex["frames"][1], _ours(pp, np.ascontiguousarray(img[::-1])))
