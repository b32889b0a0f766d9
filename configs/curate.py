r"""Data curation recipes for `python -m vlm.curate` (vlm/curate.py has the stage reference).

`:demo` cleans the embedded scenes built with injected noise (half of the training captions
belong to other images, a fifth of the images are near-duplicates of earlier ones): CLIP-score
filtering keeps the best-scoring 50%, then near-duplicates (16x16 thumbnails at cosine >= 0.997)
leave one per cluster. The scorer is the SigLIP demo trained on that same noisy set (no clean data
is used anywhere). The experiment, end to end (README "Data curation"):

  python -m vlm.train --config=configs/siglip_b16.py:demo --workdir=/tmp/siglip_noisy \
      --config.data.builder.noise_shuffled=50 --config.data.builder.noise_duplicates=20
  python -m vlm.curate --config=configs/curate.py:demo --workdir=/tmp/curate_demo
  python -m vlm.train --config=configs/siglip_b16.py:demo --workdir=/tmp/siglip_curated \
      --config.data.source=tfds:vlm_curated/scenes_noisy_curated

`:full` shows every stage (heuristics, CLIP-score, dedup, MetaCLIP balancing of the scenes'
colour and shape words, re-captioning by the CoCa demo into a new `caption_synthetic` field).
Point `data` at your own source (`tfds:NAME`, `jsonl:PATH`, `wds:GLOB`) to curate it.
"""

import ml_collections

from configs.defaults import SCENE_COLOUR_NAMES, SCENE_SHAPES, data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = data_config()
  c.data.builder.update(noise_shuffled=50, noise_duplicates=20)
  c.split = "train"
  c.caption_key = "caption_varied"  # the field the SigLIP demo trains on
  c.steps = ("clip_score", "dedup")
  c.chunk_size = 2048
  c.batch_size = 256
  c.heuristic = ml_collections.ConfigDict(
    dict(
      min_words=2,
      max_words=64,
      max_char_repeat=5,
      min_letter_fraction=0.5,
      max_word_share=0.5,
      min_image_side=16,
      max_aspect_ratio=3.0,
    )
  )
  c.clip_score = ml_collections.ConfigDict(
    dict(workdir="/tmp/siglip_noisy", keep_fraction=0.5, threshold=ml_collections.config_dict.placeholder(float))
  )
  # 'pixels': near-duplicates as in pixel space; 'model' (the scorer's image embeddings) also
  # merges different images that the model sees as the same content (semantic deduplication).
  c.dedup = ml_collections.ConfigDict(
    dict(embedding="pixels", thumbnail_size=16, threshold=0.997, num_bits=12, num_tables=16, seed=0)
  )
  c.balance = ml_collections.ConfigDict(dict(concepts=(), max_per_concept=1000, seed=0, keep_unmatched=True))
  c.recaption = ml_collections.ConfigDict(dict(workdir="/tmp/coca_demo", method="greedy", field="caption_synthetic"))
  c.output = ml_collections.ConfigDict(
    dict(
      name="scenes_noisy_curated",
      data_dir=ml_collections.config_dict.placeholder(str),
      copy_splits=("validation", "test"),
    )
  )
  if arg == "demo":
    return c
  if arg == "full":
    c.steps = ("heuristic", "clip_score", "dedup", "balance", "recaption")
    c.balance.concepts = SCENE_COLOUR_NAMES + SCENE_SHAPES
    c.output.name = "scenes_noisy_full"
    return c
  raise ValueError(f"configs/curate.py: unknown variant {arg!r}; known: demo, full")
