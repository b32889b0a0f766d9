"""Augmentation pp ops (vlm.data.augment) and MixGen in the pipeline (data.mixgen)."""

import json

import numpy as np
import pytest

from conftest import TINY_DATA
from vlm.data import augment, check_config, get_default_config, get_tokenizer, make_pipeline, parse_pp, scenes


def _scene_image(size: int = 32, seed: int = 0) -> np.ndarray:
  scene = scenes.sample_scene(np.random.default_rng(seed), [("red", "star")], video=False)
  return scenes.render(scene, size)


def _example(**kw) -> dict:
  img = _scene_image()
  ex = {
    "image": img,
    "frames": np.stack([img, img]),
    "caption": "a large red star on the left",
    "label": np.int32(scenes.class_index("red", "star")),
    "boxes": np.array([[1, 2, 10, 12]], np.float32),
  }
  ex.update(kw)
  return ex


def _run(spec: str, ex: dict, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  for op in parse_pp(spec):
    ex = op(ex, rng)
  return ex


@pytest.mark.parametrize("name", augment.RA_OPS)
def test_randaugment_each_op(name):
  spec = f"randaugment(1, 9, ops=('{name}',))"
  a, b = _run(spec, _example()), _run(spec, _example())
  img = _scene_image()
  assert a["image"].shape == img.shape and a["image"].dtype == np.uint8
  np.testing.assert_array_equal(a["image"], b["image"])  # deterministic for a seeded rng
  assert (a["image"] == img).all() == (name == "identity")
  for frame in a["frames"]:  # every image of the example gets the same transform
    np.testing.assert_array_equal(frame, a["image"])
  np.testing.assert_array_equal(a["boxes"], [[1, 2, 10, 12]])  # documented: boxes are not updated


@pytest.mark.parametrize("name", [n for n in augment.RA_OPS if n not in ("autocontrast", "equalize")])
def test_randaugment_magnitude_zero_is_identity(name):
  for seed in range(4):  # both signs
    out = _run(f"randaugment(3, 0, ops=('{name}',))", _example(), seed)
    np.testing.assert_array_equal(out["image"], _scene_image())


def test_randaugment_default_draws_vary_with_seed_and_stay_in_uint8():
  outs = [_run("decode|randaugment|resize(16)", _example(), seed)["image"] for seed in range(6)]
  assert all(o.shape == (16, 16, 3) and o.dtype == np.uint8 for o in outs)
  assert len({o.tobytes() for o in outs}) > 1
  np.testing.assert_array_equal(outs[0], _run("randaugment(2, 9)|resize(16)", _example(), 0)["image"])


def test_randaugment_geometric_false_keeps_photometric_ops_only(monkeypatch):
  drawn = []
  fn = augment.ra_image_fn
  monkeypatch.setattr(augment, "ra_image_fn", lambda name, *a: drawn.append(name) or fn(name, *a))
  (op,) = parse_pp("randaugment(2, 10, geometric=False)")
  for seed in range(40):
    op(_example(), np.random.default_rng(seed))
  assert set(drawn) == set(augment.RA_OPS) - set(augment.GEOMETRIC_OPS)


@pytest.mark.parametrize(
  "spec, match",
  [
    ("randaugment(2, 11)", "randaugment.*magnitude"),
    ("randaugment(2, -1)", "randaugment.*magnitude"),
    ("randaugment(-1, 5)", "randaugment.*num_ops"),
    ("randaugment(2, 5, ops=('rotate', 'invert'))", "randaugment.*unknown ops.*invert"),
    ("randaugment(2, 5, ops=('rotate',), geometric=False)", "randaugment.*geometric"),
    ("caption_dropout(1.5)", "caption_dropout.*p must be"),
    ("word_dropout(p=-0.1)", "word_dropout.*p must be"),
    ("synonyms(0.5, table='thesaurus')", "synonyms.*unknown table 'thesaurus'"),
    ("synonyms(0.5, key='questions')", "synonyms.*key"),
    ("template_caption(0.5, templates=['no placeholder'])", "template_caption.*templates"),
  ],
)
def test_bad_arguments_name_the_op_and_argument(spec, match):
  with pytest.raises(ValueError, match=match):
    parse_pp(spec, where="data.pp_train")


def test_randaugment_needs_uint8():
  with pytest.raises(ValueError, match="randaugment.*before value_range"):
    _run("value_range(-1, 1)|randaugment", _example())


def test_caption_and_word_dropout():
  assert _run("caption_dropout(1.0)", _example())["caption"] == ""
  rng = np.random.default_rng(0)
  state = rng.bit_generator.state
  for spec in ("caption_dropout(0)", "word_dropout(0)", "synonyms(0)", "template_caption(0)"):
    (op,) = parse_pp(spec)
    assert op(_example(), rng)["caption"] == "a large red star on the left"
  assert rng.bit_generator.state == state  # p=0 draws nothing
  words = "a large red star on the left".split()
  assert len(_run("word_dropout(1.0)", _example())["caption"].split()) == 1  # never all words
  for seed in range(5):
    got = _run("word_dropout(0.5)", _example(), seed)["caption"].split()
    assert got and all(w in words for w in got)
    assert got == [w for w in words if w in got]  # order kept
  assert (
    _run("caption_dropout(1.0, key='caption_detailed')", _example(caption_detailed="x y"))["caption_detailed"] == ""
  )


def test_synonyms_builtin_and_json(tmp_path):
  assert _run("synonyms(1.0)", _example())["caption"] == "a big red star on the left"
  got = {_run("synonyms(1.0)", _example(caption="Small grey circle."), s)["caption"] for s in range(20)}
  assert got <= {f"{a} gray {b}." for a in ("Little", "Tiny") for b in ("disc", "disk")} and len(got) > 1
  path = tmp_path / "syn.json"
  path.write_text(json.dumps({"red": ["crimson"], "left": ["left-hand side"]}))
  assert (
    _run(f"synonyms(1.0, table={str(path)!r})", _example())["caption"] == "a large crimson star on the left-hand side"
  )
  path.write_text(json.dumps({"red": "crimson"}))
  with pytest.raises(ValueError, match="synonyms: table .* must map words to non-empty lists"):
    parse_pp(f"synonyms(table={str(path)!r})")


def test_template_caption():
  name = "red star"
  prompts = {t.format(name) for t in scenes.TEMPLATES}
  got = {_run("template_caption(1.0)", _example(), s)["caption"] for s in range(20)}
  assert got <= prompts and len(got) > 1
  assert _run("template_caption(1.0)", _example(label=np.int32(-1)))["caption"] == "a large red star on the left"
  spec = "template_caption(1.0, templates=['itap of a {}'], class_names=['zero', 'one'])"
  assert _run(spec, _example(label=np.int32(1)))["caption"] == "itap of a one"
  with pytest.raises(ValueError, match="template_caption: label 5 has no class name"):
    _run(spec, _example(label=np.int32(5)))


# ----------------------------------------------------------------- MixGen through the pipeline


@pytest.fixture(scope="module")
def mix_config(data_dir):
  c = get_default_config()
  c.data_dir = str(data_dir)
  c.builder.update(TINY_DATA)
  c.pp_eval = "resize(32)|value_range(-1, 1)"
  c.text_length = 48
  return c


def _batch(config, mixgen, pp=None, seed=0):
  c = config.copy_and_resolve_references()
  if mixgen is None:
    del c["mixgen"]  # a config from before the key existed
  else:
    c.mixgen = mixgen
  it = make_pipeline(
    c, split="validation", batch_size=16, mesh=None, seed=seed, shuffle=False, num_epochs=1, pp=pp or c.pp_eval
  )
  return next(it)


def test_mixgen_mixes_images_and_concatenates_captions(mix_config):
  tok = get_tokenizer(mix_config)
  plain = _batch(mix_config, 0.0)
  whole = next(
    make_pipeline(
      mix_config,
      split="validation",
      batch_size=64,
      mesh=None,
      seed=0,
      shuffle=False,
      num_epochs=1,
      pp=mix_config.pp_eval,
    )
  )  # every example of the split
  np.testing.assert_array_equal(plain["image"], whole["image"][:16])
  mixed = _batch(mix_config, 1.0)
  np.testing.assert_array_equal(mixed["label"], plain["label"])
  for i in range(16):
    other = 2 * mixed["image"][i] - plain["image"][i]  # mixed = 0.5 own + 0.5 other
    err = np.abs(whole["image"] - other).max(axis=(1, 2, 3))
    j = int(err.argmin())
    assert err[j] < 1e-5
    want = f"{tok.decode(plain['text'][i])} {tok.decode(whole['text'][j])}"
    assert tok.decode(mixed["text"][i]) == want
  assert not np.array_equal(mixed["image"], plain["image"])


def test_mixgen_off_and_own_rng_stream(mix_config):
  pp = "randaugment(2, 9, geometric=False)|random_resized_crop(32, scale=(0.8, 1))|flip_lr|value_range(-1, 1)"
  base = _batch(mix_config, None, pp=pp)
  off = _batch(mix_config, 0.0, pp=pp)
  for k in base:
    np.testing.assert_array_equal(off[k], base[k])
  tok = get_tokenizer(mix_config)
  on = _batch(mix_config, 1.0, pp=pp)  # the example's own augmentations are unchanged by mixing
  for a, b in zip(on["text"], off["text"]):
    assert tok.decode(a).startswith(tok.decode(b) + " ")
  half = _batch(mix_config, 0.5, pp=pp)
  same = [np.array_equal(a, b) for a, b in zip(half["image"], off["image"])]
  assert any(same) and not all(same)


@pytest.mark.parametrize("value", [1.5, -0.1, 2, "0.5"])
def test_mixgen_config_is_checked(mix_config, value):
  c = mix_config.copy_and_resolve_references()
  with c.ignore_type():
    c.mixgen = value
  with pytest.raises(ValueError, match="data.mixgen"):
    check_config(c)
