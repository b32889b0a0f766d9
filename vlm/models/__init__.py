"""Model families. Configs name them through MODELS: `config.model_name = 'two_tower'`."""

from vlm.models.coca import CoCa, CoCaTextDecoder
from vlm.models.decoder import DecoderLM
from vlm.models.flava import FLAVA
from vlm.models.text import TextTransformer
from vlm.models.two_tower import TwoTower
from vlm.models.video import VideoClassifier
from vlm.models.vlmo import VLMo
from vlm.models.vit import VIT_VARIANTS, ViT, decode_variant
from vlm.models.vq import VQTokenizer
from vlm.registry import Registry, to_kwargs

MODELS: Registry = Registry("model")
MODELS.register("vit")(ViT)
MODELS.register("text")(TextTransformer)
MODELS.register("two_tower")(TwoTower)
MODELS.register("coca")(CoCa)
MODELS.register("flava")(FLAVA)
MODELS.register("video_classifier")(VideoClassifier)
MODELS.register("vlmo")(VLMo)
MODELS.register("vq_tokenizer")(VQTokenizer)
MODELS.register("decoder_lm")(DecoderLM)


def build_model(name: str, config) -> "flax.linen.Module":  # noqa: F821
  """MODELS[name](**config): a linen Module from a config's `model` block."""
  return MODELS.get(name)(**to_kwargs(config))


__all__ = ["MODELS", "CoCa", "CoCaTextDecoder", "DecoderLM", "FLAVA", "TextTransformer", "TwoTower", "VIT_VARIANTS", "VLMo", "VideoClassifier", "VQTokenizer", "ViT", "build_model", "decode_variant"]
