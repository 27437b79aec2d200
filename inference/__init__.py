"""Inference for lmlab's decoder-only models: KV cache, sampling, generation, speculative decoding.

    from inference import generate
    new_ids = generate(model, params, [[5, 17, 3], [9, 2]], max_new_tokens=20)

Modules:
  kv_cache     preallocated per-layer caches (`init_cache`) and their size (`kv_cache_bytes`)
  kv_quant     int8 / fp8 KV caches for a trained model (`with_kv_cache_quant`) and what they
               save and cost (`kv_quant_report`)
  sampling     logits filters as pure functions (repetition penalty, temperature, top-k,
               top-p, min-p), in transformers' order, and the sampler (also per-row settings)
  generate     batched prefill + decode loop (`jax.lax.while_loop`, or a jitted step per
               token when a streaming callback is given); `generate_text` for strings
  speculative  a draft model proposes, the target verifies (Leviathan et al. 2023)
  engine       continuous batching: requests join and leave slots of one decode batch
  paged        the paged KV cache: block pools, block tables, the block allocator
  load         a model, params and tokenizer from a `python -m train` workdir or a HF dir
  export       prefill and decode serialized with `jax.export`; run_exported.py runs them
               with jax and numpy only
  __main__     `python -m inference --checkpoint=PATH --prompt=TEXT`
"""

from inference.engine import Engine, Request
from inference.generate import generate, generate_text
from inference.kv_cache import cache_nbytes, init_cache, kv_cache_bytes
from inference.sampling import SamplingConfig
from inference.speculative import speculative_generate

__all__ = ["Engine", "Request", "SamplingConfig", "cache_nbytes", "generate", "generate_text", "init_cache",
           "kv_cache_bytes", "speculative_generate"]
