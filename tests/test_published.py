"""A published checkpoint as downloaded (HF directory with tokenizer and preprocessor_config.json) gives,
through vlm.predict, the probabilities that transformers' own pipeline gives; vlm.evaluate takes it too."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import TINY_DATA, notebook_script, save_hub_style  # noqa: E402
from vlm.convert.published import load_published, pp_from_processor  # noqa: E402

LABELS = ["red cat", "blue dog", "a small square", "the large circle"]
TEMPLATE = "a photo of a {}."


def _spm(path):
  import sentencepiece as spm

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
  path.write_bytes(buf.getvalue())
  return str(path)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
  """A tiny SigLIP saved as the Hub has them: 4.x-style config.json, spiece.model, preprocessor_config.json."""
  d = tmp_path_factory.mktemp("siglip")
  spm_file = _spm(d / "spm.model")
  torch.manual_seed(0)
  tower = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
  model = transformers.SiglipModel(
    transformers.SiglipConfig(
      text_config=dict(tower, vocab_size=64, max_position_embeddings=16),
      vision_config=dict(tower, image_size=32, patch_size=8),
    )
  ).eval()
  with torch.no_grad():
    model.logit_scale.fill_(2.0)
    model.logit_bias.fill_(-1.0)
  save_hub_style(model, d / "hf")
  transformers.SiglipTokenizer(vocab_file=spm_file, model_max_length=16).save_pretrained(d / "hf")
  transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d / "hf")
  from PIL import Image
  from sklearn.datasets import load_sample_images

  Image.fromarray(load_sample_images().images[1]).save(d / "flower.jpg")
  return d


def _reference(d, attention_mask=False):
  """transformers' pipeline as SigLIP's model card runs it (padding='max_length'). SigLIP was trained
  without an attention mask (big_vision; transformers 4's SiglipTokenizer returned input_ids only);
  transformers 5's tokenizer also returns one, which SiglipModel applies: dropped unless asked for."""
  from PIL import Image

  model = transformers.SiglipModel.from_pretrained(d / "hf").eval()
  proc = transformers.AutoProcessor.from_pretrained(d / "hf")
  inputs = proc(
    text=[TEMPLATE.format(x) for x in LABELS],
    images=Image.open(d / "flower.jpg"),
    padding="max_length",
    return_tensors="pt",
  )
  if not attention_mask:
    inputs.pop("attention_mask", None)
  with torch.no_grad():
    return torch.sigmoid(model(**inputs).logits_per_image[0]).numpy()


@pytest.mark.slow
def test_predict_on_a_hub_directory_matches_transformers(siglip_dir):
  from vlm.predict import predict

  ref = _reference(siglip_dir)
  ranked = dict(predict(siglip_dir / "hf", siglip_dir / "flower.jpg", LABELS, templates=[TEMPLATE]))
  ours = np.array([ranked[x] for x in LABELS])
  np.testing.assert_allclose(ours, ref, atol=1e-4)
  assert np.ptp(ref) > 1e-3  # the labels are told apart, so the comparison means something
  assert np.abs(_reference(siglip_dir, attention_mask=True) - ref).max() > 1e-3  # the mask matters


def test_published_config_reads_the_directory(siglip_dir):
  config, params = load_published(siglip_dir / "hf")
  assert config.model_name == "two_tower" and config.data.tokenizer_family == "siglip"
  assert config.data.pp_eval == pp_from_processor(siglip_dir / "hf" / "preprocessor_config.json")
  assert "resize((32, 32), method='bicubic')" in config.data.pp_eval
  assert config.data.text_length == 16 and set(params) >= {"img", "txt", "t", "b"}


@pytest.mark.slow
def test_predict_and_evaluate_command_lines(siglip_dir, data_dir):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "vlm.predict",
      f"--hf={siglip_dir / 'hf'}",
      f"--image={siglip_dir / 'flower.jpg'}",
      f"--labels={','.join(LABELS)}",
      f"--templates={TEMPLATE}",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd="/",
  )
  assert out.returncode == 0, out.stderr[-2000:]
  ranked = {r["label"]: r["prob"] for r in json.loads(out.stdout)}
  np.testing.assert_allclose([ranked[x] for x in LABELS], _reference(siglip_dir), atol=1e-4)
  ev = subprocess.run(
    [
      sys.executable,
      "-m",
      "vlm.evaluate",
      "--config=configs/siglip_b16.py:demo",
      f"--init={siglip_dir / 'hf'}",
      f"--config.data.data_dir={data_dir}",
      *[f"--config.data.builder.{k}={v}" for k, v in TINY_DATA.items()],
      "--config.evals.zeroshot.max_examples=64",
      "--config.evals.retrieval.max_examples=64",
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert any(k.startswith("zeroshot") for k in json.loads(ev.stdout))
  bad = subprocess.run(
    [sys.executable, "-m", "vlm.evaluate", f"--init={siglip_dir / 'hf'}"], capture_output=True, text=True, timeout=300
  )
  assert bad.returncode != 0 and "pass --config with the evaluations" in bad.stderr


@pytest.mark.slow
def test_published_checkpoints_notebook(siglip_dir, tmp_path):
  """experiments/published_checkpoints.ipynb on the tiny Hub-style SigLIP: import, zero-shot, export back;
  the export loads in transformers and gives the original model's logits."""
  from pathlib import Path

  repo = Path(__file__).resolve().parents[1]
  script = tmp_path / "nb.py"
  script.write_text(notebook_script(repo / "experiments" / "published_checkpoints.ipynb"))
  env = dict(
    __import__("os").environ,
    VLM_CHECKPOINT=str(siglip_dir / "hf"),
    VLM_IMAGE=str(siglip_dir / "flower.jpg"),
    VLM_EXPORT=str(tmp_path / "export"),
    JAX_PLATFORMS="cpu",
  )
  proc = subprocess.run([sys.executable, str(script)], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert "max |param difference| after export + import: 0.0" in proc.stdout
  ranked = json.loads(proc.stdout[proc.stdout.index("[") : proc.stdout.index("]") + 1])
  assert len(ranked) == 4 and all(0 < r["prob"] < 1 for r in ranked)
  original = transformers.SiglipModel.from_pretrained(siglip_dir / "hf").eval()
  exported = transformers.SiglipModel.from_pretrained(tmp_path / "export").eval()
  rng = np.random.default_rng(0)
  pixels, ids = (
    torch.tensor(rng.normal(size=(2, 3, 32, 32)).astype(np.float32)),
    torch.tensor(rng.integers(0, 64, (2, 16))),
  )
  with torch.no_grad():
    np.testing.assert_allclose(
      exported(input_ids=ids, pixel_values=pixels).logits_per_text.numpy(),
      original(input_ids=ids, pixel_values=pixels).logits_per_text.numpy(),
      atol=1e-5,
    )
