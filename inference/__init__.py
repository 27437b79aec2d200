"""Inference for lmlab's decoder-only models: KV cache, sampling, generation, speculative decoding.

    from inference import generate
    new_ids = generate(model, params, [[5, 17, 3], [9, 2]], max_new_tokens=20)

Modules:
  kv_cache     preallocated per-layer caches (`init_cache`) and their size (`kv_cache_bytes`)
  sampling     logits filters as pure functions (repetition penalty, temperature, top-k,
               top-p, min-p), in transformers' order, and the sampler
  generate     batched prefill + decode loop (`jax.lax.while_loop`, or a jitted step per
               token when a streaming callback is given)
  speculative  a draft model proposes, the target verifies (Leviathan et al. 2023)
"""

from inference.generate import generate
from inference.kv_cache import cache_nbytes, init_cache, kv_cache_bytes
from inference.sampling import SamplingConfig
from inference.speculative import speculative_generate

__all__ = ["SamplingConfig", "cache_nbytes", "generate", "init_cache", "kv_cache_bytes", "speculative_generate"]
