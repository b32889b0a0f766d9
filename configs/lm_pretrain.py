r"""A small decoder-only language model (Llama-style: RMSNorm, RoPE, SwiGLU, grouped KV heads) trained
on the embedded dataset's text: the backbone of the VLM demos (configs/llava_*.py, configs/blip2_*.py,
configs/frozen.py), since no pretrained LM can be downloaded here.

  python -m vlm.train --config=configs/lm_pretrain.py:demo --workdir=/tmp/vlm_lm_demo

`:demo_cm3` trains the same LM on the documents alone with the CM3 objective (Aghajanyan et al.
2022; vlm.data.cm3): Poisson(1) spans (at most 3, up to 8 tokens) replaced by sentinels <mask:i>
(ids 1005-1007) and moved to the end, all trained left to right.

Data (vlm.data.conversation): plain documents (detailed caption, then the scene's question/answer
pairs; loss on every token) and text-only chats in the VLM's chat template (loss on the answers),
so the LM knows the template, the vocabulary and the answer formats before it ever sees an image.
The vocabulary is the embedded SentencePiece tokenizer's 1000 pieces + 8 ids for the template's
special markers (vlm.data.conversation.DEFAULT_SPECIALS: <image> 1000, <|system|> 1001, <|user|>
1002, <|assistant|> 1003, soft prompt 1004; <|end|> is EOS).

On a cluster, skip this config: the VLM configs' `init.path` takes an HF Llama / Qwen2 / Gemma
directory (config.json + safetensors) directly (vlm.checkpoint.load_params imports it).
"""

import ml_collections

from configs.common import base_config, demo_data

LM_VOCAB = 1008  # 1000 SentencePiece pieces + special markers (vlm.data.conversation)


def demo_lm() -> dict:
  """The demo LM: 4 blocks of width 128, 4 query heads sharing 2 KV heads, tied embeddings."""
  return dict(
    vocab_size=LM_VOCAB,
    width=128,
    depth=4,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=352,
    mlp_act="swiglu",
    rope_theta=10_000.0,
    norm_eps=1e-6,
    tie_embeddings=True,
  )


def conversation(
  tasks: tuple[str, ...],
  *,
  image_tokens: int = 16,
  with_image: bool = True,
  length: int = 96,
  task_weights: tuple[float, ...] | None = None,
  pack: int = 1,
  instruction_length: int = 0,
) -> ml_collections.ConfigDict:
  """data.conversation with the default chat template (vlm.data.conversation.DEFAULT_TEMPLATE);
    pack > 1 packs that many examples into each training row of `length` tokens (raise it with pack;
    vlm.data.conversation.pack_examples); instruction_length > 0 also gives the image encoder the user's
  instruction (an instruction-aware Q-Former: configs/blip2_stage2.py)."""
  return ml_collections.ConfigDict(
    dict(
      tasks=tasks,
      task_weights=task_weights,
      image_tokens=image_tokens,
      with_image=with_image,
      length=length,
      pack=pack,
      soft_prompts=0,
      instruction_length=instruction_length,
      instructions=ml_collections.ConfigDict(),
      question_format="{question}",
      prompt_length=image_tokens + 24,
      max_turns=3,
      add_bos=True,
      system=None,
      template=ml_collections.ConfigDict(
        dict(
          system="<|system|>{content}<|end|>",
          user="<|user|>{content}<|end|>",
          assistant="<|assistant|>{content}<|end|>",
          generation_prefix="<|assistant|>",
        )
      ),
      specials=ml_collections.ConfigDict(
        {
          "<image>": 1000,
          "<|system|>": 1001,
          "<|user|>": 1002,
          "<|assistant|>": 1003,
          "<|soft_prompt|>": 1004,
          "<|end|>": 1,
        }
      ),
    )
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in ("demo", "demo_cm3"):
    raise ValueError(
      "configs/lm_pretrain.py: only the 'demo' and 'demo_cm3' variants exist; at scale, import a "
      "pretrained LM (vlm.convert.import_hf) and give its directory to the VLM config's init.path"
    )
  c = base_config()
  c.model_name = "decoder_lm"
  c.model = demo_lm()
  c.objective_name = "lm"
  c.objective = ml_collections.ConfigDict(dict(image_key=None))
  demo_data(c)
  c.data.extra_text_keys = ("caption_detailed",)
  c.data.conversation = conversation(("text", "qa"), with_image=False, task_weights=(1.0, 1.0))
  if arg == "demo_cm3":
    c.data.conversation.update(tasks=("text",), task_weights=None)
    c.data.cm3 = ml_collections.ConfigDict(
      dict(
        sentinel_ids=(1005, 1006, 1007),
        num_spans=ml_collections.config_dict.placeholder(int),
        poisson_lambda=1.0,
        max_spans=3,
        max_span_len=8,
        protected_ids=(),
      )
    )
  c.evals = ml_collections.ConfigDict()
  c.batch_size = 64
  c.total_steps = 400
  c.lr = 3e-3
  c.wd = 0.1
  c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=50))
  c.log_every = 50
  c.checkpoint_every = 400
  return c
