"""Parameter-efficient fine-tuning for every model: LoRA (Hu et al. 2021) and bottleneck adapters
(Houlsby et al. 2019), added from outside the model code through `flax.linen.intercept_methods`.

Config (a top-level trainer key, `config.peft`; None or absent: full fine-tuning):

    config.peft = dict(
        method='lora',          # 'lora' | 'adapter' | 'lora+adapter' (or a list of them)
        rank=8, alpha=16.0,     # LoRA rank r and scale alpha (the update is alpha / r * x A B)
        targets=[r'.*attn/(query|value)'],  # regexes, fullmatch on linear layers' module paths
        dropout=0.0,            # LoRA dropout on the layer input (training only)
        adapter_dim=64,         # adapter bottleneck width
        adapter_targets=[r'.*(block_\\d+|layers)'],  # regexes on block module paths
        train_also=[],          # extra parameter-path regexes to train, e.g. [r'connector/.*']
        save_only_peft=False,   # also write <workdir>/peft_params/ (trainable leaves only) at the end
    )

How it works. `build_model(name, model_cfg, peft=config.peft)` returns a subclass of the model
class (same name, same fields, same methods) whose `init` / `apply` run inside an interceptor:

  - LoRA: after a matching linear layer (`nn.Dense`, `nn.DenseGeneral`, `vlm.nn.attention.HeadsDense`)
    computes y = x W (+ b), the interceptor creates two parameters on that same module,
    `lora_a` [in, r] (kaiming-uniform, as loralib / HF PEFT) and `lora_b` [r, out] (zeros), and
    returns y + alpha / r * reshape(dropout(x_flat) A B). They sit beside `kernel` in the params
    tree (e.g. `txt/encoder/block_0/attn/query/lora_a`), carry the kernel's logical axis names
    (in-axis of A, out-axis of B) and get a leading 'layers' axis under nn.scan like every
    other parameter. B = 0, so the initial model is exactly the base model.
  - Adapters: after a matching block module returns y (for a tuple, its first element), the
    interceptor runs a child module `adapter` of that block: y + up(gelu(down(LN(y)))), `up`
    zero-initialised (identity at init); params `<block>/adapter/{norm,down,up}/...`.

Objectives, evaluations and predict code need no change: `model.apply(..., method=Cls.encode_image)`
and `type(model)` work as before. Creating params inside an interceptor is legal because flax
runs interceptors inside the intercepted method's compact scope; it works under nn.scan and
nn.remat (tested). `model.bind(...)` is not intercepted: use init/apply.

Only PEFT parameters (plus `train_also`) are trained: `vlm.optim.build_optimizer` reads
`config.peft` and freezes every other parameter (no optimiser state). For export,
`merge_lora` folds W + alpha / r * A B into the kernels; `python -m vlm.peft merge --workdir=DIR
--out=DIR2` writes a plain checkpoint (and config.json without `peft`) that the plain model
loads with `checkpoint.load_params(DIR2)` / `vlm.evaluate --workdir=DIR2`. Writing and reading the
PEFT leaves (save_peft, load_peft) and merging a run's workdir (merge_workdir) are in vlm.checkpoint;
Monkey's per-window LoRA sets are vlm.models.monkey.lora_sets.

Modules: config (config.peft, the PEFT leaves' names and regexes), modules (Adapter, the LoRA update),
intercept (the interceptor, peft_class, with_peft), params (count_params, peft_params, merge_lora);
`python -m vlm.peft` is the merge CLI (__main__).
"""

from vlm.peft.config import (
  ADAPTER_NAME,
  ADAPTER_TRAINABLE,
  LORA_PARAMS,
  LORA_SET_PARAMS,
  LORA_TRAINABLE,
  PeftConfig,
  compile_patterns,
  default_config,
  is_peft_path,
  parse_config,
  trainable_regexes,
)
from vlm.peft.intercept import peft_class, with_peft
from vlm.peft.modules import LINEAR_TYPES, Adapter, lora_update
from vlm.peft.params import count_params, merge_lora, peft_params

__all__ = [
  "ADAPTER_NAME",
  "ADAPTER_TRAINABLE",
  "LINEAR_TYPES",
  "LORA_PARAMS",
  "LORA_SET_PARAMS",
  "LORA_TRAINABLE",
  "Adapter",
  "PeftConfig",
  "compile_patterns",
  "count_params",
  "default_config",
  "is_peft_path",
  "lora_update",
  "merge_lora",
  "parse_config",
  "peft_class",
  "peft_params",
  "trainable_regexes",
  "with_peft",
]
