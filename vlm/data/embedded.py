"""The embedded "scenes" dataset: procedurally rendered, built locally, no download.

Storage: a real TFDS dataset (`vlm_scenes/<config>/1.0.0`) in ArrayRecord
format, written by `tfds.core.GeneratorBasedBuilder` without TensorFlow.
TFDS' `Image` feature needs TF to encode, so images are stored as encoded PNG
bytes in a scalar `Tensor(dtype=object)` feature (frames likewise). Readable by
`tfds.data_source("vlm_scenes/<config>", data_dir=...)` (random access, no TF)
or by name through the `tfds:` source of the pipeline.

TFDS builds into `incomplete.*` and renames on success, so an interrupted build
is never taken for a good one; the tokenizer is trained inside that temporary
directory before the rename. Building twice with the same arguments gives
identical bytes (per-example seeds, no shuffling, single-threaded SentencePiece).

Build explicitly:
    python -m vlm.data.embedded --data_dir=DIR [--num_train=20000 --image_size=64 --num_frames=0]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from vlm.data import scenes
from vlm.data.tfds_compat import import_tfds
from vlm.data.tokenizer import train_tokenizer

tfds = import_tfds()

NAME = "vlm_scenes"
VERSION = "1.3.0"  # 1.1.0: caption_varied; 1.2.0: arrow replaces hexagon; 1.3.0: phrasings
TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "validation", "test")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclasses.dataclass(frozen=True)
class BuildArgs:
  """Everything that determines the dataset's bytes."""

  num_train: int = 20000
  num_validation: int = 1000
  num_test: int = 2000
  image_size: int = 64
  num_frames: int = 0  # >0 adds a `frames` clip of the main object moving
  seed: int = 0
  vocab_size: int = 1000
  text_rich: int = 0  # 1: every image has small text (vlm.data.scenes.TEXT_RICH_SCALE); same tokenizer
  # Injected noise for curation experiments (train split only; see `noise_of`): percent of
  # examples whose captions belong to another random example, and percent that are near-duplicates
  # (a re-encoded copy: brightness and pixel noise, same captions) of an earlier example. The
  # tokenizer is unchanged.
  noise_shuffled: int = 0
  noise_duplicates: int = 0
  # > 1: every example is an interleaved document (`make_document`) of 2..documents images
  documents: int = 0
  # 1 (with num_frames >= 3): every example is a clip of events (`make_clip`, vlm.data.scenes.sample_clip)
  # with per-frame subtitles and video questions; the tokenizer is the image scenes' (see `corpus`)
  video_events: int = 0

  @property
  def config_name(self) -> str:
    if self == BuildArgs():
      return "default"
    if self == BuildArgs(text_rich=1):
      return "textrich"
    return (
      f"n{self.num_train}-{self.num_validation}-{self.num_test}_px{self.image_size}"
      f"_f{self.num_frames}_s{self.seed}_v{self.vocab_size}"
      + ("_textrich" if self.text_rich else "")
      + (f"_noise{self.noise_shuffled}-{self.noise_duplicates}" if self.noise_shuffled or self.noise_duplicates else "")
      + (f"_docs{self.documents}" if self.documents else "")
      + ("_events" if self.video_events else "")
    )


def default_data_dir() -> str:
  return os.environ.get("VLM_DATA_DIR") or os.path.expanduser("~/.cache/vlm/data")


def combos(split: str) -> list[tuple[str, str]]:
  """(colour, shape) combos sampled in a split: train lacks the held-out ones."""
  all_combos = [(c, s) for c in scenes.COLOUR_NAMES for s in scenes.SHAPES]
  if split == "train":
    return [cs for cs in all_combos if not scenes.is_held_out(*cs)]
  return all_combos


def metadata(args: BuildArgs) -> dict:
  names = scenes.class_names()
  held = [scenes.class_index(c, s) for c, s in combos("validation") if scenes.is_held_out(c, s)]
  return {
    "class_names": names,
    "templates": list(scenes.TEMPLATES),
    "held_out_classes": held,
    "colours": list(scenes.COLOUR_NAMES),
    "shapes": list(scenes.SHAPES),
    "motions": list(scenes.MOTIONS),
    "image_size": args.image_size,
    "num_frames": args.num_frames,
    "seed": args.seed,
    **({"clip_question_kinds": list(scenes.CLIP_QUESTION_KINDS)} if args.video_events else {}),
  }


def noise_of(args: BuildArgs, split: str, index: int) -> tuple[int, int]:
  """(duplicate_of, captions_from) of example `index`: -1 where it is clean (always outside train).

  duplicate_of = j < index: the image is example j's with its brightness scaled by 0.9-1.1 and
  +-4 levels of pixel noise (as a re-encoded copy), with j's captions; captions_from = k: the
  captions are those of (clean) example k, the image is not.
  A pure function of its arguments, so experiments can score a filter against the truth.
  """
  if split != "train" or not (args.noise_shuffled or args.noise_duplicates):
    return -1, -1
  rng = np.random.default_rng([args.seed, 0, index, 2])
  u_dup, u_cap = rng.random(2) * 100
  j, k = int(rng.integers(max(index, 1))), int(rng.integers(args.num_train - 1))
  dup = j if index > 0 and u_dup < args.noise_duplicates else -1
  if dup >= 0:  # a duplicate of a duplicate shows the same scene as the first one
    root = noise_of(args, split, dup)[0]
    dup = root if root >= 0 else dup
  cap = (k + (k >= index)) if u_cap < args.noise_shuffled else -1  # never its own captions
  return dup, cap


def _scene(args: BuildArgs, split: str, index: int) -> scenes.Scene:
  rng = np.random.default_rng([args.seed, SPLITS.index(split), index])
  return scenes.sample_scene(rng, combos(split), video=args.num_frames > 0, text_rich=bool(args.text_rich))


def _captions(args: BuildArgs, split: str, index: int, scene: scenes.Scene) -> dict:
  short, detailed = scenes.captions(scene)
  varied = scenes.varied_caption(scene, np.random.default_rng([args.seed, SPLITS.index(split), index, 1]))
  return {"caption": short, "caption_detailed": detailed, "caption_varied": varied}


def _near_copy(image: np.ndarray, seed: list[int]) -> np.ndarray:
  """A near-duplicate, not a byte copy: brightness x U(0.9, 1.1) and U(-4, 4) pixel noise."""
  rng = np.random.default_rng(seed)
  out = image.astype(np.float32) * rng.uniform(0.9, 1.1) + rng.uniform(-4, 4, image.shape)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def make_example(args: BuildArgs, split: str, index: int) -> dict:
  """Renders example `index` of `split` (a pure function of its arguments)."""
  dup, cap = noise_of(args, split, index)
  shown = dup if dup >= 0 else index
  scene = _scene(args, split, shown)
  texts = _captions(args, split, shown, scene)
  if cap >= 0:
    texts = _captions(args, split, cap, _scene(args, split, cap))
  qs, ans = scenes.questions(scene)
  size = args.image_size
  frames = []
  if args.num_frames > 0:
    frames = [
      scenes.encode_png(scenes.render(scene, size, shift=sh))
      for sh in scenes.motion_shifts(scene.motion, args.num_frames)
    ]
  m = scene.main
  return {
    "image": scenes.encode_png(
      _near_copy(scenes.render(scene, size), [args.seed, 0, index, 3]) if dup >= 0 else scenes.render(scene, size)
    ),
    **texts,
    "label": np.int32(scenes.class_index(m.colour, m.shape)),
    "seen": not scenes.is_held_out(m.colour, m.shape),
    "questions": qs,
    "answers": ans,
    "boxes": np.asarray([o.box(size) for o in scene.objects], np.float32),
    "box_labels": np.asarray([scenes.class_index(o.colour, o.shape) for o in scene.objects], np.int32),
    "text": scene.text or "",
    "frames": frames,
    "motion": np.int32(scene.motion),
  }


def make_document(args: BuildArgs, split: str, index: int) -> dict:
  """Interleaved document `index` of `split` (OBELICS layout: parallel lists `texts` / `images`,
  each position one text paragraph or one image, '' / b'' at the other kind's): an opening line,
  then 2..args.documents images, each followed by a paragraph about it (its varied caption);
  `questions` / `answers` ask about the k-th image ("what colour is the large star in the second
  image?"), `labels` are the images' classes."""
  from vlm.data.conversation import about_image

  rng = np.random.default_rng([args.seed, SPLITS.index(split), index, 4])
  m = 2 + int(rng.integers(max(args.documents - 1, 1)))
  texts, images, labels, questions, answers = [f"{DIGIT_WORDS[m]} pictures follow."], [b""], [], [], []
  size = args.image_size
  for k in range(m):
    scene = _scene(args, split, index * args.documents + k)
    varied = scenes.varied_caption(scene, np.random.default_rng([args.seed, SPLITS.index(split), index, 5, k]))
    texts += ["", varied]
    images += [scenes.encode_png(scenes.render(scene, size)), b""]
    labels.append(scenes.class_index(scene.main.colour, scene.main.shape))
    qs, ans = scenes.questions(scene)
    questions += [about_image(q, k) for q in qs[:2]]
    answers += ans[:2]
  return {
    "texts": texts,
    "images": images,
    "labels": np.asarray(labels, np.int32),
    "questions": questions,
    "answers": answers,
    "label": np.int32(labels[0]),
    "seen": all(not scenes.is_held_out(*scenes.colour_shape(lab)) for lab in labels),
  }


def make_clip(args: BuildArgs, split: str, index: int) -> dict:
  """Clip of events `index` of `split` (vlm.data.scenes.sample_clip): 'frames' (num_frames PNGs),
  'image' its middle frame (frame num_frames // 2, as a manifest clip's), 'subtitles' (one per
  frame), the clip caption as every caption, the video questions (scenes.clip_questions; their
  kinds in scenes.CLIP_QUESTION_KINDS order), 'label' the mover's class, 'seen' whether all four
  objects are train combos, 'boxes' of the middle frame's objects, 'motion' the mover's direction."""
  if args.num_frames < 3:
    raise ValueError(f"video_events needs num_frames >= 3 (a clip with changes), got {args.num_frames}")
  clip = scenes.sample_clip(
    np.random.default_rng([args.seed, SPLITS.index(split), index, 6]), combos(split), args.num_frames
  )
  frames = scenes.render_clip(clip, args.image_size)
  qs, ans = scenes.clip_questions(clip)
  caption = scenes.clip_caption(clip)
  mid = clip.objects_at(args.num_frames // 2)
  every = [clip.still, clip.mover, *clip.changes]
  return {
    "image": scenes.encode_png(frames[args.num_frames // 2]),
    "caption": caption,
    "caption_detailed": caption,
    "caption_varied": caption,
    "label": np.int32(scenes.class_index(clip.mover.colour, clip.mover.shape)),
    "seen": all(not scenes.is_held_out(o.colour, o.shape) for o in every),
    "questions": qs,
    "answers": ans,
    "boxes": np.asarray([o.box(args.image_size) for o in mid], np.float32),
    "box_labels": np.asarray([scenes.class_index(o.colour, o.shape) for o in mid], np.int32),
    "text": "",
    "frames": [scenes.encode_png(f) for f in frames],
    "subtitles": scenes.clip_subtitles(clip),
    "motion": np.int32(clip.motion),
  }


def corpus(args: BuildArgs) -> list[str]:
  """Sentences the tokenizer is trained on (train texts, class names, templates, digits). Clips of
  events take the image scenes' corpus (num_frames=0): their tokenizer is that dataset's, so a VLM
  on them starts from the LM and vision demos trained on the image scenes (the clips' new words,
  e.g. 'disappear', become several pieces)."""
  if args.video_events:
    return corpus(dataclasses.replace(args, video_events=0, num_frames=0))
  out = []
  for i in range(min(args.num_train, 5000)):
    rng = np.random.default_rng([args.seed, 0, i])
    scene = scenes.sample_scene(rng, combos("train"), video=args.num_frames > 0)
    out += list(scenes.captions(scene)) + [" ".join(p) for p in zip(*scenes.questions(scene))]
    out.append(scenes.varied_caption(scene, np.random.default_rng([args.seed, 0, i, 1])))
  names = scenes.class_names()
  out += [t.format(n) for t in scenes.TEMPLATES for n in names]  # includes held-out names
  out += [f"a handwritten digit {w}" for w in DIGIT_WORDS] + [str(i) for i in range(100)]
  out += list(scenes.WORDS) + [f"{w} moves {m}" for w in scenes.SHAPES for m in scenes.MOTIONS]
  return out


class VlmScenes(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == "__main__"):
  """Procedural scenes for contrastive, captioning, VQA, grounding and video."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="default")]

  def __init__(self, *, build_args: BuildArgs | None = None, **kwargs):
    self.build_args = build_args or BuildArgs()
    name = self.build_args.config_name
    kwargs.setdefault("config", name if name == "default" else tfds.core.BuilderConfig(name=name))
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self):
    bytes_ = tfds.features.Tensor(shape=(), dtype=np.object_)
    if self.build_args.documents:
      return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
          {
            "texts": tfds.features.Sequence(tfds.features.Text()),
            "images": tfds.features.Sequence(bytes_),
            "labels": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "questions": tfds.features.Sequence(tfds.features.Text()),
            "answers": tfds.features.Sequence(tfds.features.Text()),
            "label": tfds.features.Scalar(dtype=np.int32),
            "seen": tfds.features.Scalar(dtype=np.bool_),
          }
        ),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(metadata(self.build_args)),
        description="Interleaved image-text documents of the procedural scenes.",
      )
    features = tfds.features.FeaturesDict(
      {
        "image": bytes_,
        "caption": tfds.features.Text(),
        "caption_detailed": tfds.features.Text(),
        "caption_varied": tfds.features.Text(),
        "label": tfds.features.Scalar(dtype=np.int32),
        "seen": tfds.features.Scalar(dtype=np.bool_),
        "questions": tfds.features.Sequence(tfds.features.Text()),
        "answers": tfds.features.Sequence(tfds.features.Text()),
        "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
        "box_labels": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "text": tfds.features.Text(),
        "frames": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        "motion": tfds.features.Scalar(dtype=np.int32),
        **({"subtitles": tfds.features.Sequence(tfds.features.Text())} if self.build_args.video_events else {}),
      }
    )
    return self.dataset_info_from_configs(
      features=features,
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(metadata(self.build_args)),
      description=__doc__.split("\n")[0],
    )

  def _split_generators(self, dl_manager):
    a = self.build_args
    sizes = {"train": a.num_train, "validation": a.num_validation, "test": a.num_test}
    return {s: self._generate_examples(s, n) for s, n in sizes.items()}

  def _generate_examples(self, split: str, n: int):
    make = make_document if self.build_args.documents else make_clip if self.build_args.video_events else make_example
    for i in range(n):
      yield i, make(self.build_args, split, i)

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    # self.data_dir is the temporary `incomplete.*` directory here.
    train_tokenizer(corpus(self.build_args), Path(self.data_dir) / TOKENIZER_FILE, self.build_args.vocab_size)


def dataset_dir(data_dir: str | None = None, **build_kwargs) -> Path:
  """Directory of the built dataset (may not exist yet)."""
  args = BuildArgs(**build_kwargs)
  return Path(data_dir or default_data_dir()) / NAME / args.config_name / VERSION


def build(data_dir: str | None = None, **build_kwargs) -> Path:
  """Builds the dataset unless already built; returns its directory."""
  data_dir = data_dir or default_data_dir()
  builder = VlmScenes(build_args=BuildArgs(**build_kwargs), data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return Path(builder.data_dir)


def tokenizer_path(data_dir: str | None = None, **build_kwargs) -> str:
  """Path of the dataset's SentencePiece model (builds the dataset on first use)."""
  return os.fspath(build(data_dir, **build_kwargs) / TOKENIZER_FILE)


def tfds_name(**build_kwargs) -> str:
  """Name to load the dataset by with TFDS, e.g. `vlm_scenes/default`."""
  return f"{NAME}/{BuildArgs(**build_kwargs).config_name}"


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data_dir", default=None)
  for f in dataclasses.fields(BuildArgs):
    p.add_argument(f"--{f.name}", type=int, default=f.default)
  ns = vars(p.parse_args(argv))
  data_dir = ns.pop("data_dir")
  # Under `python -m` this file is `__main__`; TFDS needs the builder's real module.
  from vlm.data import embedded

  t0 = time.time()
  path = embedded.build(data_dir, **ns)
  print(f"{tfds_name(**ns)} ready at {path} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
  main()
