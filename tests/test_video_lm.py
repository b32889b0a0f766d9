"""Video QA with a VLM on an LM (configs/video_lm.py) on the clips of events: LLaVA-NeXT-Video's `<video>`
path trains and answers end to end. (MiniGPT4-Video's frames-as-images path is the multi-image VLM the
other VLM tests train; its data are tests/test_video_qa_data.py's. No learning threshold yet: at the bed's
tiny sizes, 600 steps on direction questions gave 45.3 / 36.7 / 33.6% with 8 frames against 26.6 / 30.9%
with the middle frame, seeds 0-2, too close for a test.)"""

import ml_collections
import numpy as np
import pytest

from helpers import TINY_DATA, shrink, tiny_vlm
from vlm.train import train


@pytest.mark.slow
def test_a_clip_at_the_video_placeholder_trains_and_is_answered(data_dir, tmp_path):
  """LLaVA-NeXT-Video's path (configs/video_lm.py:demo_pool): the batch's 'frames' reach the model as
  `videos` at the `<video>` placeholders in training (no placeholder count mismatch) and in the VQA
  eval, which answers every question."""
  from configs import video_lm
  from vlm.evals.base import build_evals
  from vlm.load import load_run

  c = shrink(tiny_vlm(video_lm.get_config("demo_pool")), data_dir, 3, batch_size=16)
  c.init = ml_collections.ConfigDict(dict(path=None, mapping=None, step=None))  # fresh weights: wiring only
  c.evals.vqa.max_examples = 16
  out = train(c, tmp_path)
  assert out["train/video_token_mismatch"] == 0.0 and np.isfinite(out["train/loss"])
  assert "vqa/accuracy_direction" in out or "vqa/accuracy_colour" in out
  assert c.data.builder.num_train == TINY_DATA["num_train"] and c.data.conversation.video_tokens == 32
  config, model, mesh, params = load_run(tmp_path)
  ev = build_evals(config, model, mesh)["vqa"]
  ev(params)
  assert len(ev.last_answers) == 16
