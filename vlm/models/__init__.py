"""Model families. Configs name them through MODELS: `config.model_name = 'two_tower'`."""

from flax import linen as nn

from vlm.models.blip2 import Blip2QFormer
from vlm.models.video_llama import VideoQFormer
from vlm.models.coca import CoCa, CoCaTextDecoder
from vlm.models.decoder import DecoderLM
from vlm.models.early_fusion import EarlyFusionLM
from vlm.models.flamingo import Flamingo
from vlm.models.flava import FLAVA
from vlm.models.llip import Llip
from vlm.models.fuyu import FuyuPatchEmbed
from vlm.models.monkey import Monkey
from vlm.models.text import TextTransformer
from vlm.models.two_tower import TwoTower
from vlm.models.vision_lm import VisionLanguageModel
from vlm.models.video import VideoClassifier
from vlm.models.vlmo import VLMo
from vlm.models.vit import VIT_VARIANTS, ViT, decode_variant
from vlm.models.vq import VQTokenizer
from vlm.models import coca, decoder, early_fusion, flamingo, llip, two_tower, video, vision_lm, vlmo, vq
from vlm.models.registry import MODELS, PREDICT_FNS, predict_fns
from vlm.registry import to_kwargs

MODELS.register("vit")(ViT)
MODELS.register("text")(TextTransformer)
MODELS.register("two_tower")(TwoTower)
MODELS.register("llip")(Llip)
MODELS.register("coca")(CoCa)
MODELS.register("flava")(FLAVA)
MODELS.register("video_classifier")(VideoClassifier)
MODELS.register("vlmo")(VLMo)
MODELS.register("vq_tokenizer")(VQTokenizer)
MODELS.register("blip2_qformer")(Blip2QFormer)
MODELS.register("video_qformer")(VideoQFormer)
MODELS.register("decoder_lm")(DecoderLM)
MODELS.register("vision_lm")(VisionLanguageModel)
MODELS.register("monkey")(Monkey)
MODELS.register("flamingo")(Flamingo)
MODELS.register("fuyu_patches")(FuyuPatchEmbed)
MODELS.register("early_fusion")(EarlyFusionLM)

# What evaluators, vlm.predict and vlm.curation call on each family (vlm.models.registry.PREDICT_FNS).
PREDICT_FNS.register("two_tower")(two_tower.predict_fns)
PREDICT_FNS.register("llip")(llip.predict_fns)
PREDICT_FNS.register("coca")(coca.predict_fns)
PREDICT_FNS.register("flava")(two_tower.predict_fns)
PREDICT_FNS.register("video_classifier")(video.predict_fns)
PREDICT_FNS.register("vlmo")(vlmo.predict_fns)
PREDICT_FNS.register("vq_tokenizer")(vq.predict_fns)
PREDICT_FNS.register("blip2_qformer")(two_tower.predict_fns)
PREDICT_FNS.register("decoder_lm")(decoder.predict_fns)
PREDICT_FNS.register("vision_lm")(vision_lm.predict_fns)
PREDICT_FNS.register("flamingo")(flamingo.predict_fns)
PREDICT_FNS.register("early_fusion")(early_fusion.predict_fns)


def build_model(name: str, config, peft=None) -> nn.Module:
  """MODELS[name](**config): a linen Module from a config's `model` block.

  peft: the trainer's `config.peft` (vlm.peft; None or empty: the plain model). With it, the model
  is an instance of a same-named subclass whose init/apply add LoRA / adapter parameters.
  """
  cls = MODELS.get(name)
  if peft:
    from vlm.peft import peft_class

    cls = peft_class(cls, peft)
  return cls(**to_kwargs(config))


__all__ = [
  "MODELS",
  "PREDICT_FNS",
  "Blip2QFormer",
  "VideoQFormer",
  "CoCa",
  "CoCaTextDecoder",
  "DecoderLM",
  "EarlyFusionLM",
  "Flamingo",
  "FLAVA",
  "FuyuPatchEmbed",
  "Llip",
  "Monkey",
  "TextTransformer",
  "TwoTower",
  "VIT_VARIANTS",
  "VLMo",
  "VideoClassifier",
  "VisionLanguageModel",
  "VQTokenizer",
  "ViT",
  "build_model",
  "predict_fns",
  "decode_variant",
]
