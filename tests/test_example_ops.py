"""The example ops (vlm.data.example_ops): the registry's order, the op list a config builds, each op's
own config check, and that running the ops on a record is what the pipeline batches."""

import ml_collections
import numpy as np
import pytest
from helpers import TINY_DATA

from vlm.data import check_config, example_ops, get_default_config, get_tokenizer, load_split_numpy, make_source

ORDER = [
  "decode",
  "pp",
  "document",
  "mixgen",
  "grounding",
  "question_regex",
  "interleave",
  "frames_as_images",
  "image",
  "text",
  "label",
  "text_detailed",
  "question",
  "answer_label",
  "image_layout",
  "conversation",
  "cm3",
  "boxes",
  "frames",
]
ANYRES = "decode|anyres([[32, 64], [64, 32]], 32, 4)|value_range(-1, 1)"


def _config(data_dir) -> ml_collections.ConfigDict:
  c = get_default_config()
  c.data_dir = str(data_dir)
  c.builder.update(TINY_DATA)
  c.pp_train = "decode|random_resized_crop(32, scale=(0.8, 1))|flip_lr|value_range(-1, 1)"
  c.pp_eval = "decode|resize(32)|value_range(-1, 1)"
  c.text_length = 16
  return c


def _names(c, pp=None) -> list[str]:
  ops = example_ops.make_ops(
    c, c.pp_train if pp is None else pp, tokenizer=get_tokenizer(c), source=make_source(c, "train")
  )
  return example_ops.op_names(ops)


def test_ops_are_registered_in_the_order_they_run():
  assert example_ops.known_ops() == ORDER
  assert [example_ops.get_op(n).name for n in ORDER] == ORDER
  with pytest.raises(ValueError, match="unknown example op 'nope'; known: decode, pp, document"):
    example_ops.get_op("nope")


def test_the_op_list_names_what_the_config_turns_on(data_dir):
  c = _config(data_dir)
  assert _names(c) == ["decode", "pp", "document", "image", "text", "label"]
  c.extra_text_keys = ("caption_detailed", "question", "answer")
  c.answer_vocab = ["red", "blue"]
  c.mixgen = 0.5
  c.question_regex = "colour"
  c.with_boxes = c.with_frames = True
  c.interleaved_images = 2
  c.grounding = ml_collections.ConfigDict(dict(tasks=("refer",)))
  c.conversation = ml_collections.ConfigDict(dict(tasks=("qa",)))
  check_config(c)
  assert _names(c) == [n for n in ORDER if n not in ("image_layout", "cm3", "frames_as_images")]
  # CM3 (on a text conversation) and AnyRes's layout (on the pp op anyres) come in where they belong.
  t = _config(data_dir)
  t.conversation = ml_collections.ConfigDict(dict(tasks=("text",), length=64))
  t.cm3 = ml_collections.ConfigDict(dict(sentinel_ids=(1005, 1006), max_spans=2))
  t.pp_train = ANYRES
  check_config(t)
  assert _names(t) == ["decode", "pp", "document", "image", "text", "label", "image_layout", "conversation", "cm3"]
  assert "image_layout" not in _names(t, pp=t.pp_eval)  # the layout op follows the pp spec in use


# (op, key, value, the error): each op's check raises today's error of the key it reads, and no other
# op's check does.
BAD = [
  ("decode", "max_image_pixels", 0, "data.max_image_pixels: must be a positive int or None"),
  ("pp", "pp_train", "decode|flipp", "data.pp_train: unknown op 'flipp' at position 2"),
  ("pp", "pp_eval", "resize(0)", "data.pp_eval: bad argument for op 'resize' at position 1"),
  ("document", "max_images", 0, "data.max_images: must be >= 1"),
  ("mixgen", "mixgen", 1.5, r"data.mixgen: must be a probability in \[0, 1\]"),
  ("grounding", "grounding", dict(tasks=("nope",)), "data.grounding.tasks"),
  ("question_regex", "question_regex", "(", "data.question_regex: bad regex"),
  ("interleave", "interleaved_images", 0, "data.interleaved_images: must be an int >= 1"),
  ("interleave", "interleaved_images", 2, r"data.interleaved_images > 1 needs data.conversation with tasks=\('qa',\)"),
  ("text", "extra_text_keys", ("bogus",), "data.extra_text_keys: unknown key 'bogus'"),
  ("text", "text_length", 0, "data.text_length: must be a positive int"),
  ("text_detailed", "detailed_text_length", -1, "data.detailed_text_length: must be a positive int"),
  ("answer_label", "answer_vocab", ["red"], "data.answer_vocab needs 'question' in data.extra_text_keys"),
  ("conversation", "conversation", dict(tasks=("bogus",)), "data.conversation.tasks: unknown task 'bogus'"),
  ("cm3", "cm3", dict(sentinel_ids=(1005,)), r"data.cm3 needs data.conversation with tasks=\('text',\)"),
  ("boxes", "max_boxes", 0, "data.max_boxes: must be a positive int"),
  ("frames_as_images", "frames_as_images", 1, "data.frames_as_images: True or False, got 1"),
  ("frames_as_images", "subtitles", True, "data.subtitles: interleaves subtitles with the frames; needs data.frames"),
]


@pytest.mark.parametrize("name,key,value,match", BAD, ids=[f"{b[0]}:{b[1]}={b[2]!r}" for b in BAD])
def test_each_op_checks_its_own_keys(name, key, value, match):
  c = get_default_config()
  with c.ignore_type():
    c[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  with pytest.raises(ValueError, match=match):
    example_ops.get_op(name).check(c)
  with pytest.raises(ValueError, match=match):
    check_config(c)
  others = []
  for other in example_ops.known_ops():
    try:
      example_ops.get_op(other).check(c)
    except ValueError:
      others.append(other)
  assert others == [name]


def test_cross_feature_rules_are_the_ops_checks():
  c = get_default_config()
  c.pp_train = ANYRES
  c.mixgen = 0.5
  with pytest.raises(ValueError, match="data.mixgen does not work with the pp op 'anyres'"):
    example_ops.get_op("mixgen").check(c)
  c.mixgen = 0.0
  c.conversation = ml_collections.ConfigDict(dict(tasks=("qa",), pack=2))
  with pytest.raises(ValueError, match="the pp op 'anyres' gives one image per example"):
    example_ops.get_op("image_layout").check(c)
  d = get_default_config()
  d.builder.documents = 3
  d.mixgen = 0.5
  with pytest.raises(ValueError, match="do not work with interleaved documents"):
    example_ops.get_op("document").check(d)
  with pytest.raises(ValueError, match="do not work with interleaved documents"):
    check_config(d)


def test_running_the_ops_on_records_gives_the_pipelines_examples(data_dir):
  """load_split_numpy (no shuffle: example i at stream position i) equals run_ops on the records."""
  c = _config(data_dir)
  c.extra_text_keys = ("caption_detailed", "question", "answer")
  c.with_boxes = True
  arrays, _ = load_split_numpy(c, "test", max_examples=4, chunk=4)
  source = make_source(c, "test")
  ops = example_ops.make_ops(c, c.pp_eval, tokenizer=get_tokenizer(c), source=source)
  for i in range(4):
    out = example_ops.run_ops(ops, source[i], i, 0)
    assert set(out) == set(arrays)
    for k, v in out.items():
      assert np.asarray(v).dtype == arrays[k].dtype, k
      np.testing.assert_array_equal(v, arrays[k][i], err_msg=k)
