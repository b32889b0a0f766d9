"""Procedural scenes: the objects, their rendering, captions and questions.

One scene = one large, clear *main object* (shape x colour x size x position),
optionally a few small distractor objects and a rendered word or number. The
zero-shot class of a scene is "<colour> <shape>" of its main object.

Clips of events (the video QA test bed, `sample_clip` / `render_clip`): two objects, one of which
moves, and two small objects that each appear or disappear at a frame of their own, with subtitles
(a word said at each change) and questions that need more than one frame.

Everything here is a pure function of a `np.random.Generator`, so a scene is
fully determined by its seed. Rendering uses PIL at 2x resolution and a BOX
downsample (cheap anti-aliasing).
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {
  "red": (220, 30, 30),
  "green": (30, 170, 50),
  "blue": (40, 80, 230),
  "yellow": (240, 220, 30),
  "purple": (140, 50, 190),
  "orange": (250, 140, 20),
  "pink": (250, 130, 200),
  "cyan": (40, 220, 230),
}
# Shapes stay distinguishable at 32 px (a hexagon was not: at 10 px across it renders as a circle).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "arrow")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
POSITION_PHRASES = {
  "left": "on the left",
  "right": "on the right",
  "top": "at the top",
  "bottom": "at the bottom",
  "center": "in the center",
}
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down")
MOTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), image axes
WORDS: tuple[str, ...] = (
  "cat",
  "dog",
  "sun",
  "stop",
  "open",
  "exit",
  "sale",
  "jax",
  "tree",
  "bird",
  "fish",
  "moon",
  "go",
  "yes",
  "no",
  "map",
  "box",
  "car",
  "hat",
  "cup",
)
TEMPLATES: tuple[str, ...] = (
  "a photo of a {}.",
  "a {} on a plain background.",
  "a picture of a {}.",
  "a drawing of a {}.",
  "a rendering of a {}.",
  "a {}.",
)
COLOUR_NAMES = tuple(COLOURS)


def class_names() -> list[str]:
  """All zero-shot classes "<colour> <shape>", index = colour * len(SHAPES) + shape."""
  return [f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES]


def class_index(colour: str, shape: str) -> int:
  return COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)


def colour_shape(label: int) -> tuple[str, str]:
  """Class index -> (colour, shape): the inverse of class_index."""
  return COLOUR_NAMES[label // len(SHAPES)], SHAPES[label % len(SHAPES)]


def is_held_out(colour: str, shape: str) -> bool:
  """Fixed ~20% of (colour, shape) combos never appear in train.

  The rule (3*c + s) % 5 == 0 holds out 1-2 shapes per colour and 1-2 colours
  per shape, so every colour and every shape is still seen in train.
  """
  return (3 * COLOUR_NAMES.index(colour) + SHAPES.index(shape)) % 5 == 0


@dataclasses.dataclass
class SceneObject:
  shape: str
  colour: str
  cx: float  # centre, fraction of the image width
  cy: float
  radius: float  # fraction of the image width

  def box(self, size: int) -> list[float]:
    r = self.radius * size
    x, y = self.cx * size, self.cy * size
    return [max(0.0, x - r), max(0.0, y - r), min(float(size), x + r), min(float(size), y + r)]


@dataclasses.dataclass
class Scene:
  main: SceneObject
  size_word: str
  position: str
  distractors: list[SceneObject]
  text: str | None
  text_xy: tuple[float, float]
  background: tuple[int, int, int]
  motion: int  # index into MOTIONS, -1 if no video
  text_scale: float = 0.2  # font size, fraction of the image width

  @property
  def objects(self) -> list[SceneObject]:
    return [self.main, *self.distractors]


def _position_centre(position: str, radius: float, rng: np.random.Generator) -> tuple[float, float]:
  edge = radius + 0.04  # keep the object inside the image
  jitter = lambda: float(rng.uniform(-0.04, 0.04))  # noqa: E731
  if position == "left":
    return edge + 0.02 + jitter() * 0.5, 0.5 + jitter()
  if position == "right":
    return 1 - edge - 0.02 + jitter() * 0.5, 0.5 + jitter()
  if position == "top":
    return 0.5 + jitter(), edge + 0.02 + jitter() * 0.5
  if position == "bottom":
    return 0.5 + jitter(), 1 - edge - 0.02 + jitter() * 0.5
  return 0.5 + jitter(), 0.5 + jitter()


# Text-rich scenes: every image has its text, small (TEXT_RICH_SCALE of the width: legible at 64 px,
# a blur at 32 px), centred in the left or right half so that it lies inside one 2x2 window.
TEXT_RICH_SCALE = 0.11


def sample_scene(
  rng: np.random.Generator, combos: list[tuple[str, str]], *, video: bool, text_rich: bool = False
) -> Scene:
  """Samples a scene whose main object is one of `combos` (colour, shape); text_rich: always with
  small text (the high-resolution test bed; the draws before the text are the same)."""
  colour, shape = combos[int(rng.integers(len(combos)))]
  size_word = SIZES[int(rng.integers(2))]
  position = POSITIONS[int(rng.integers(len(POSITIONS)))]
  radius = float(rng.uniform(0.26, 0.31) if size_word == "large" else rng.uniform(0.16, 0.19))
  cx, cy = _position_centre(position, radius, rng)
  main = SceneObject(shape, colour, cx, cy, radius)
  # Distractors: small objects in the corners away from the main object.
  distractors = []
  if rng.random() < 0.4:
    corners = [(0.1, 0.1), (0.9, 0.1), (0.1, 0.9), (0.9, 0.9)]
    corners = [c for c in corners if math.hypot(c[0] - cx, c[1] - cy) > radius + 0.12]
    order = rng.permutation(len(corners))
    for k in order[: int(rng.integers(1, 3))]:
      dc = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
      ds = SHAPES[int(rng.integers(len(SHAPES)))]
      distractors.append(SceneObject(ds, dc, corners[k][0], corners[k][1], 0.075))
  text, text_xy = None, (0.0, 0.0)
  if rng.random() < 0.3 or text_rich:
    text = str(int(rng.integers(100))) if rng.random() < 0.5 else WORDS[int(rng.integers(len(WORDS)))]
    # Put the text in the half opposite to the main object.
    text_xy = (0.5, 0.12) if cy > 0.5 or position == "center" and rng.random() < 0.5 else (0.5, 0.88)
    if text_rich:
      text_xy = (0.25 if rng.random() < 0.5 else 0.75, text_xy[1])
  grey = int(rng.integers(70, 110))
  background = (grey, grey, grey)
  motion = int(rng.integers(len(MOTIONS))) if video else -1
  return Scene(
    main, size_word, position, distractors, text, text_xy, background, motion, TEXT_RICH_SCALE if text_rich else 0.2
  )


def _polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]] | None:
  def ring(n, rad, phase):
    return [
      (x + rad * math.cos(phase + 2 * math.pi * i / n), y + rad * math.sin(phase + 2 * math.pi * i / n))
      for i in range(n)
    ]

  if shape == "square":
    return ring(4, r * 1.25, math.pi / 4)
  if shape == "triangle":
    return [(x, y - r), (x + r * 0.95, y + r * 0.8), (x - r * 0.95, y + r * 0.8)]
  if shape == "diamond":
    return [(x, y - r), (x + r * 0.7, y), (x, y + r), (x - r * 0.7, y)]
  if shape == "arrow":  # pointing up, so flip_lr keeps it an arrow
    h, w = 0.1 * r, 0.32 * r
    return [
      (x, y - r),
      (x + 0.85 * r, y - h),
      (x + w, y - h),
      (x + w, y + r),
      (x - w, y + r),
      (x - w, y - h),
      (x - 0.85 * r, y - h),
    ]
  if shape == "star":
    outer, inner = ring(5, r, -math.pi / 2), ring(5, r * 0.42, -math.pi / 2 + math.pi / 5)
    return [p for pair in zip(outer, inner) for p in pair]
  if shape == "cross":
    a = r * 0.35
    return [
      (x - a, y - r),
      (x + a, y - r),
      (x + a, y - a),
      (x + r, y - a),
      (x + r, y + a),
      (x + a, y + a),
      (x + a, y + r),
      (x - a, y + r),
      (x - a, y + a),
      (x - r, y + a),
      (x - r, y - a),
      (x - a, y - a),
    ]
  return None  # circle


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, px: int, dx: float = 0.0, dy: float = 0.0) -> None:
  x, y, r = (obj.cx + dx) * px, (obj.cy + dy) * px, obj.radius * px
  fill = COLOURS[obj.colour]
  poly = _polygon(obj.shape, x, y, r)
  if poly is None:
    draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
  else:
    draw.polygon(poly, fill=fill)


_FONTS: dict[int, ImageFont.ImageFont] = {}


def _font(px: int):
  if px not in _FONTS:
    _FONTS[px] = ImageFont.load_default(size=max(8, px))
  return _FONTS[px]


def render(scene: Scene, size: int, *, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
  """Renders the scene to a [size, size, 3] uint8 image; `shift` moves the main object."""
  px = 2 * size
  img, draw = _canvas(size, scene.background)
  for obj in scene.distractors:
    _draw_object(draw, obj, px)
  _draw_object(draw, scene.main, px, *shift)
  if scene.text is not None:
    draw.text(
      (scene.text_xy[0] * px, scene.text_xy[1] * px),
      scene.text,
      fill=(255, 255, 255),
      font=_font(int(scene.text_scale * px)),
      anchor="mm",
    )
  return _downsample(img, size)


def _canvas(size: int, background: tuple[int, int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
  """An empty image at 2x the output size (drawn there, then BOX-downsampled: cheap anti-aliasing)."""
  img = Image.new("RGB", (2 * size, 2 * size), background)
  return img, ImageDraw.Draw(img)


def _downsample(img: Image.Image, size: int) -> np.ndarray:
  return np.asarray(img.resize((size, size), Image.Resampling.BOX))


def motion_shifts(motion: int, num_frames: int, step: float = 0.04) -> list[tuple[float, float]]:
  """Per-frame (dx, dy) offsets of the main object, centred on its rest position."""
  direction = MOTION_VECTORS[MOTIONS[motion]]
  mid = (num_frames - 1) / 2
  return [(direction[0] * step * (t - mid), direction[1] * step * (t - mid)) for t in range(num_frames)]


def encode_png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def _a(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def captions(scene: Scene) -> tuple[str, str]:
  """(short caption, detailed caption). Both name colour and shape of the main object."""
  m = scene.main
  short = f"a {scene.size_word} {m.colour} {m.shape} {POSITION_PHRASES[scene.position]}"
  parts = [
    f"{_a(scene.size_word)} {scene.size_word} {m.colour} {m.shape} {POSITION_PHRASES[scene.position]}"
    " on a grey background"
  ]
  if scene.distractors:
    parts.append("with " + " and ".join(f"a small {d.colour} {d.shape}" for d in scene.distractors))
  detailed = " ".join(parts)
  if scene.text is not None:
    detailed += f". the text says {scene.text}"
  if scene.motion >= 0:
    detailed += f". the {m.shape} moves {MOTIONS[scene.motion]}"
  return short, detailed


# Phrasings of the varied caption: CLIP-style training text mixes full descriptions (half of
# them: size, colour, shape, position) with short, prompt-like ones, so the zero-shot templates
# ("a photo of a {}.") are in distribution.
CAPTION_PHRASINGS: tuple[str, ...] = (
  "{a} {size} {colour} {shape} {pos}",
  "a photo of {a} {size} {colour} {shape} {pos}.",
  "a picture of {a} {size} {colour} {shape} {pos}.",
  "a drawing of {a} {size} {colour} {shape} {pos}.",
  "{size} {colour} {shape}, {pos}",
  "{a} {size} {colour} {shape} {pos} on a plain background.",
  "a {colour} {shape} {pos}",
  "a photo of a {colour} {shape}.",
  "a picture of {a} {size} {colour} {shape}.",
  "a {colour} {shape} on a plain background.",
  "a rendering of a {colour} {shape}.",
  "a {colour} {shape}.",
)


def varied_caption(scene: Scene, rng: np.random.Generator) -> str:
  """One of CAPTION_PHRASINGS, filled in for the main object (always colour and shape)."""
  m = scene.main
  phrasing = CAPTION_PHRASINGS[int(rng.integers(len(CAPTION_PHRASINGS)))]
  return phrasing.format(
    a=_a(scene.size_word), size=scene.size_word, colour=m.colour, shape=m.shape, pos=POSITION_PHRASES[scene.position]
  )


def answer_vocab() -> list[str]:
  """Every answer `questions` can give, in a fixed order (the classes of VQA as classification)."""
  answers = [*COLOUR_NAMES, *SHAPES, "1", "2", "3", *POSITIONS, *SIZES, *MOTIONS, *(str(i) for i in range(100)), *WORDS]
  return list(dict.fromkeys(answers))


def questions(scene: Scene) -> tuple[list[str], list[str]]:
  """VQA pairs about the scene: (questions, answers)."""
  m = scene.main
  qa = [
    (f"what colour is the {scene.size_word} {m.shape}?", m.colour),
    (f"what shape is the {scene.size_word} {m.colour} object?", m.shape),
    ("how many objects are there?", str(len(scene.objects))),
    (f"where is the {m.colour} {m.shape}?", scene.position),
    (f"is the {m.colour} {m.shape} large or small?", scene.size_word),
  ]
  if scene.text is not None:
    qa.append(("what does the text say?", scene.text))
  if scene.motion >= 0:
    qa.append((f"which way does the {m.shape} move?", MOTIONS[scene.motion]))
  return [q for q, _ in qa], [a for _, a in qa]


# ------------------------------------------------------------------------------------------- clips
EVENTS: tuple[str, ...] = ("appears", "disappears")
CORNERS: tuple[tuple[float, float], ...] = ((0.1, 0.1), (0.9, 0.1), (0.1, 0.9), (0.9, 0.9))


def _name(obj: SceneObject) -> str:
  return f"{obj.colour} {obj.shape}"


@dataclasses.dataclass
class Clip:
  """A clip of num_frames frames: `still` and `mover` (medium objects on one diagonal; the mover shifts
  CLIP_STEP per frame in direction MOTIONS[motion], at rest in the middle frame), and two small
  corner objects `changes[i]` with `kinds[i]` (0 appears: absent before frame `frames[i]`; 1
  disappears: absent from it on); `words[i]` is said (the subtitle) at frame `frames[i]`."""

  still: SceneObject
  mover: SceneObject
  motion: int
  changes: tuple[SceneObject, SceneObject]
  kinds: tuple[int, int]
  frames: tuple[int, int]
  words: tuple[str, str]
  background: tuple[int, int, int]
  num_frames: int

  @property
  def first(self) -> int:
    """Index of the change that happens first."""
    return 0 if self.frames[0] < self.frames[1] else 1

  def visible(self, i: int, t: int) -> bool:
    """Whether change object i is in frame t."""
    return (t >= self.frames[i]) == (self.kinds[i] == 0)

  def objects_at(self, t: int) -> list[SceneObject]:
    """The objects frame t shows, the mover at its shifted place."""
    direction = MOTION_VECTORS[MOTIONS[self.motion]]
    # At rest in the middle frame (t = num_frames // 2), so that frame alone says nothing of the direction.
    dx, dy = (CLIP_STEP * (t - self.num_frames // 2) * d for d in direction)
    mover = dataclasses.replace(self.mover, cx=self.mover.cx + dx, cy=self.mover.cy + dy)
    return [self.still, mover] + [c for i, c in enumerate(self.changes) if self.visible(i, t)]


CLIP_STEP = 0.035  # the mover's shift per frame, fraction of the width (8 frames: 0.245 end to end)


def sample_clip(rng: np.random.Generator, combos: list[tuple[str, str]], num_frames: int) -> Clip:
  """A clip whose four objects are distinct `combos` (no colour or shape twice, so a name says which).
  The changes happen at two distinct frames of the 2 * (T - 1 - T // 2) frames around the middle
  one (T = num_frames; 2..7 of 8), as many at or before it as after it: whether a change object is in
  the middle frame then says nothing of whether it appears or disappears."""
  if num_frames < 3:
    raise ValueError(f"a clip of events needs num_frames >= 3, got {num_frames}")
  picked: list[tuple[str, str]] = []
  while len(picked) < 4:
    c, s = combos[int(rng.integers(len(combos)))]
    if all(c != pc and s != ps for pc, ps in picked):
      picked.append((c, s))
  jitter = lambda: float(rng.uniform(-0.02, 0.02))  # noqa: E731
  radius = [float(rng.uniform(0.11, 0.13)) for _ in range(2)]
  # The two big objects on one diagonal, the small ones in the other two corners: the mover travels
  # 7 * CLIP_STEP in any direction without touching another object or leaving the image.
  diagonal = int(rng.integers(2))
  places = [(0.3 + jitter(), 0.3 + jitter()), (0.7 + jitter(), 0.7 + jitter())]
  if diagonal:
    places = [(x, 1 - y) for x, y in places]
  big = [SceneObject(s, c, x, y, r) for (c, s), (x, y), r in zip(picked[:2], places, radius)]
  m = int(rng.integers(2))
  corners = [CORNERS[k] for k in ((1, 2) if not diagonal else (0, 3))]
  if rng.random() < 0.5:
    corners.reverse()
  small = tuple(SceneObject(s, c, *xy, 0.075) for (c, s), xy in zip(picked[2:], corners))
  mid = num_frames // 2
  frames = rng.choice(np.arange(2 * mid - num_frames + 2, num_frames), size=2, replace=False)
  words = rng.choice(len(WORDS), size=2, replace=False)
  grey = int(rng.integers(70, 110))
  return Clip(
    still=big[1 - m],
    mover=big[m],
    motion=int(rng.integers(len(MOTIONS))),
    changes=small,
    kinds=(int(rng.integers(2)), int(rng.integers(2))),
    frames=(int(frames[0]), int(frames[1])),
    words=(WORDS[int(words[0])], WORDS[int(words[1])]),
    background=(grey, grey, grey),
    num_frames=num_frames,
  )


def render_clip(clip: Clip, size: int) -> list[np.ndarray]:
  """The clip's frames, each [size, size, 3] uint8 (rendered as `render` does: 2x, BOX downsample)."""
  out = []
  for t in range(clip.num_frames):
    img, draw = _canvas(size, clip.background)
    for obj in clip.objects_at(t):
      _draw_object(draw, obj, 2 * size)
    out.append(_downsample(img, size))
  return out


def clip_subtitles(clip: Clip) -> list[str]:
  """One subtitle per frame: the word said at that frame, '' where nothing is said."""
  subs = [""] * clip.num_frames
  for t, w in zip(clip.frames, clip.words):
    subs[t] = w
  return subs


def clip_caption(clip: Clip) -> str:
  """The clip's events in time order, e.g. 'the red star moves left. the blue circle appears, then the
  green cross disappears'."""
  i = clip.first
  first, then = (f"the {_name(clip.changes[j])} {EVENTS[clip.kinds[j]]}" for j in (i, 1 - i))
  return f"the {_name(clip.mover)} moves {MOTIONS[clip.motion]}. {first}, then {then}"


# Question kinds of clip_questions, in its order; the first four need more than one frame.
CLIP_QUESTION_KINDS: tuple[str, ...] = ("direction", "mover", "change", "order", "subtitle", "colour")


def clip_questions(clip: Clip) -> tuple[list[str], list[str]]:
  """Video QA pairs about the clip (CLIP_QUESTION_KINDS): the mover's direction (4 answers; the question
  does not name the mover, so that a conversation's other turns do not give away which moves), which of
  the two objects moves, whether a corner object appears or disappears, which change comes first,
  the word said at a change (needs the subtitles and the frame of the change), and a still object's
  colour (one frame is enough: the single-frame baseline's control)."""
  a, b = clip.changes
  qa = [
    ("which way does the moving object go?", MOTIONS[clip.motion]),
    ("which object moves?", _name(clip.mover)),
    (f"does the {_name(a)} appear or disappear?", EVENTS[clip.kinds[0]].removesuffix("s")),
    (f"which changes first, the {_name(a)} or the {_name(b)}?", _name(clip.changes[clip.first])),
    (f"what is said when the {_name(a)} changes?", clip.words[0]),
    (f"what colour is the {clip.still.shape}?", clip.still.colour),
  ]
  return [q for q, _ in qa], [ans for _, ans in qa]
