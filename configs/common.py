"""Pieces shared by the configs: the trainer defaults and the demo-sized towers.

The defaults taken from vlm (sharding rules, `config.data`, `config.peft`) are the copies in configs/defaults.py.
"""

import ml_collections

from configs.defaults import DEFAULT_RULES, data_config, peft_config


def base_config() -> ml_collections.ConfigDict:
  """Trainer defaults every recipe starts from."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  c.rules = [list(r) for r in DEFAULT_RULES]
  c.data = data_config()
  c.batch_size = 256
  c.total_steps = 1000
  c.accum_steps = 1
  c.optimizer = "adamw"
  c.optimizer_kw = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8))
  c.lr = 1e-3
  c.wd = 1e-4
  c.wd_mask = r".*(kernel|embedding)$"
  c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=100))
  c.grad_clip_norm = 1.0
  c.frozen = ()
  c.trainable = ()  # regexes; parameters matching none are frozen (vlm.optim)
  c.peft = peft_config()  # LoRA / adapters (vlm.peft): off until peft.method is set
  c.lr_mults = ()
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.async_checkpoint = True
  c.tensorboard = True
  # Numerics and kernels: the demos (CPU) run in float32; every full recipe sets model.dtype = 'bfloat16'.
  c.attention_impl = "auto"  # jax.nn.dot_product_attention: 'auto' (cuDNN on GPU where allowed), 'xla', 'cudnn'
  # XLA options for the train step's compilation only (flag names without '--'; vlm.train_step.make_train_step),
  # e.g. {'xla_gpu_enable_latency_hiding_scheduler': True}; the rest of the process keeps XLA_FLAGS.
  c.compiler_options = ml_collections.ConfigDict()
  c.evals = ml_collections.ConfigDict()
  c.eval_at_start = False
  c.init = ml_collections.ConfigDict(dict(path=None, mapping=None, step=None))
  return c


def demo_two_tower(
  temperature_init: float, bias_init: float | None, text_pool: str = "eos", max_scale: float | None = None
) -> dict:
  """Small towers for the embedded scenes at 32 px (a 2-core CPU trains them in minutes)."""
  return dict(
    image=dict(width=128, depth=4, mlp_dim=512, num_heads=4, patch_size=8, pool_type="map"),
    text=dict(
      width=128,
      depth=2,
      mlp_dim=512,
      num_heads=4,
      vocab_size=1000,
      max_len=16,
      pool_type=text_pool,
      eos_id=1,
      out_dim=128,
    ),
    temperature_init=temperature_init,
    bias_init=bias_init,
    max_scale=max_scale,
  )


def demo_trainer(c: ml_collections.ConfigDict, steps: int = 1500) -> None:
  """Batch, schedule and logging of the 2-core CPU demos (about 3 steps/s)."""
  c.batch_size = 128
  c.total_steps = steps
  c.lr = 1e-3
  c.schedule.warmup_steps = 100
  c.log_every = 25
  c.checkpoint_every = 250


def demo_data(c: ml_collections.ConfigDict) -> None:
  """The embedded scenes, 32 px, 16 tokens, evaluated on the test split."""
  # No random crops: they move objects across the position words of the captions and cut large
  # shapes at the border (with random_resized_crop(32, scale=(0.7, 1)), seen-combination zero-shot
  # top-1 after 500 steps was 58%; without, 91%). flip_lr swaps "left"/"right" in the captions.
  c.data.pp_train = "decode|resize(32)|flip_lr|value_range(-1, 1)"
  c.data.pp_eval = "decode|resize(32)|value_range(-1, 1)"
  c.data.text_length = 16
  c.data.caption_key = "caption_varied"  # varied phrasings for training (vlm.data.scenes.CAPTION_PHRASINGS)
  # Evaluated halfway and at the end of the 1.5k-step demos (each round costs ~10-20 s of a 10-minute run).
  c.evals = ml_collections.ConfigDict(
    dict(
      zeroshot=dict(type="zeroshot", every=750, split="test", max_examples=ml_collections.config_dict.placeholder(int)),
      # Retrieval on the canonical captions: each names size, colour, shape and position.
      retrieval=dict(
        type="retrieval",
        every=750,
        split="test",
        caption_key="caption",
        max_examples=ml_collections.config_dict.placeholder(int),
      ),
    )
  )
