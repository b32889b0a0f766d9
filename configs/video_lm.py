r"""Video QA with a VLM on an LM: the clips of events (vlm.data.scenes.sample_clip: two objects of
which one moves, two small ones that each appear or disappear at a frame of their own, a word said
at each change) asked questions that need more than one frame (the direction of the motion, which
object moves, whether an object appears or disappears, which change comes first, what is said at a
change) and one that does not (a still object's colour).

`:demo` is MiniGPT4-Video (Ataallah et al. 2024, sec. 3.1): every frame through the image encoder,
every 4 adjacent visual tokens concatenated into one (model.merge_tokens = 4: 4x fewer tokens, a 4x
wider connector input), each frame's tokens followed by that frame's subtitle (data.frames_as_images,
data.subtitles), then the question, into the LM. The encoder is frozen; the connector and the LM
learn (MiniGPT4-Video trains the projection and LoRA on the LM; here the whole tiny LM). The clips are
8 frames, all of them kept (pp `sample_frames(8)`).

`:demo_pool` is LLaVA-NeXT-Video (Zhang et al. 2024): the clip at one `<video>` placeholder
(data.conversation.video_tokens, model.video_token_id; data.with_frames gives the batch its 'frames',
objective.video_key passes them as `videos`), every frame through the image encoder and its 4 x 4
feature grid average-pooled with stride 2 (model.video_pool), 4 tokens per frame as above, no
subtitles (the LLaVA-NeXT-Video prompt has none).

`:demo_middle` and `:demo_pool_middle` are the single-frame baselines: the same model, data and
steps, fed only the clip's middle frame (`sample_frames(1, 'middle')`); in `:demo_middle` every
subtitle goes with that frame, in time order (vlm.data.preprocess.regroup_subtitles), so the
baseline reads the same words.

Both start from the CLIP demo's image tower and the LM demo (the clips use the image scenes'
tokenizer: vlm.data.embedded.corpus):

  python -m vlm.train --config=configs/clip_b16.py:demo --workdir=/tmp/clip_demo
  python -m vlm.train --config=configs/lm_pretrain.py:demo --workdir=/tmp/vlm_lm_demo
  python -m vlm.train --config=configs/video_lm.py:demo --workdir=/tmp/video_demo/frames
  python -m vlm.train --config=configs/video_lm.py:demo_middle --workdir=/tmp/video_demo/middle
  python -m vlm.train --config=configs/video_lm.py:demo_pool --workdir=/tmp/video_demo/pool
  python -m vlm.train --config=configs/video_lm.py:demo_pool_middle --workdir=/tmp/video_demo/pool_middle

`vqa/accuracy` is exact match of greedy answers to one drawn question per test clip, and
`vqa/accuracy_<kind>` per question kind (evals.vqa.question_groups: direction, mover, change, order,
subtitle, colour). Chance: direction 25%, mover / change / order 50% (two candidates named in the
clip), subtitle 50% (two words said).
"""

import ml_collections

from configs.common import base_config, demo_data
from configs.lm_pretrain import conversation
from configs.llava_base import demo_init, model, vqa_eval

NUM_FRAMES = 8
MERGE = 4  # MiniGPT4-Video: 4 adjacent tokens -> 1
VIDEO_ID = 1006  # the <video> placeholder (data.conversation.specials, model.video_token_id)
# evals.vqa.question_groups: question kind -> a regex its questions match (vlm.data.scenes.clip_questions)
QUESTION_GROUPS = dict(
  direction="^which way",
  mover="^which object moves",
  change="^does the",
  order="^which changes first",
  subtitle="^what is said",
  colour="^what colour",
)


VARIANTS = ("demo", "demo_middle", "demo_pool", "demo_pool_middle")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in VARIANTS:
    raise ValueError(
      f"configs/video_lm.py: unknown variant {arg!r}; known: {', '.join(VARIANTS)} (at scale, import a "
      "video LM from its HF directory: README 'Video')"
    )
  middle = arg.endswith("_middle")
  pooled = arg.startswith("demo_pool")
  frames = 1 if middle else NUM_FRAMES
  c = base_config()
  c.model_name = "vision_lm"
  c.model = model(demo=True)
  demo_data(c)
  c.data.builder.update(num_frames=NUM_FRAMES, video_events=1, image_size=32)
  sample = "sample_frames(1, 'middle')" if middle else f"sample_frames({NUM_FRAMES})"
  c.data.pp_train = f"decode|{sample}|flip_lr|value_range(-1, 1)"
  c.data.pp_eval = f"decode|{sample}|value_range(-1, 1)"
  c.data.caption_key = "caption"
  c.data.text_length = 32  # the questions (eval groups match their text)
  c.data.extra_text_keys = ("question", "answer")
  tokens = (32 // 8) ** 2 // MERGE  # per frame: 4 x 4 patches -> 4 (merged or pooled)
  c.data.conversation = conversation(("qa",), image_tokens=tokens, length=64 + tokens * frames)
  c.data.conversation.prompt_length = 48 + tokens * frames
  if pooled:  # LLaVA-NeXT-Video: the clip at <video>, each frame's 4 x 4 grid average-pooled to 2 x 2
    c.model.update(video_token_id=VIDEO_ID, video_pool=dict(mode="average", stride=2))
    c.data.with_frames = True
    c.data.conversation.specials["<video>"] = VIDEO_ID
    c.data.conversation.video_tokens = tokens * frames
    c.objective = ml_collections.ConfigDict(dict(image_key=None, video_key="frames"))
  else:  # MiniGPT4-Video: frames as images, 4 adjacent tokens merged, each frame's subtitle after it
    c.model.merge_tokens = MERGE
    c.data.frames_as_images = True
    c.data.subtitles = True
    c.objective = ml_collections.ConfigDict(dict(image_key="image"))
  c.objective_name = "lm"
  c.frozen = (r"vision/.*",)
  c.init = demo_init()
  c.wd = 0.0
  c.grad_clip_norm = 1.0
  c.batch_size = 64
  c.total_steps = 800
  c.lr = 1e-3
  c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=30))
  c.log_every = 25
  c.evals = vqa_eval(every=0)
  c.evals.vqa.max_new_tokens = 8
  c.evals.vqa.question_groups = ml_collections.ConfigDict(QUESTION_GROUPS)
  c.checkpoint_every = c.total_steps
  return c
