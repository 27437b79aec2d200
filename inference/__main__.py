"""Continue text prompts with a trained model: `python -m inference --checkpoint=PATH --prompt=TEXT`.

PATH is a `python -m train` workdir (its latest checkpoint, or --step) or a Hugging Face
model directory (config.json, model.safetensors, tokenizer.json). Greedy by default:

    python -m inference --checkpoint=/tmp/tiny --prompt="The " --max_new_tokens=40
    python -m inference --checkpoint=/tmp/tiny --prompt="The " --prompt="A list" --temperature=0.8 --top_p=0.95
    python -m inference --checkpoint=/tmp/tiny --prompt="The " --kv_cache=int8   # or fp8: a quantized KV cache
"""

import sys

from absl import app, flags

from inference.generate import generate_text
from inference.kv_quant import KV_CACHE_CHOICES, with_kv_cache_quant
from inference.load import DTYPES, load
from train import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A `python -m train` workdir or a Hugging Face directory.")
_PROMPT = flags.DEFINE_multi_string("prompt", [""], "Text to continue; repeat the flag for a batch.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "The most tokens generated per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 for greedy decoding.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling: the smallest set of tokens with this probability.")
_MIN_P = flags.DEFINE_float("min_p", None, "Drop tokens below min_p times the top token's probability.")
_REPETITION_PENALTY = flags.DEFINE_float("repetition_penalty", None, "> 1 makes tokens already seen less likely.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "The workdir checkpoint step (default: the latest).")
_DTYPE = flags.DEFINE_enum("dtype", None, list(DTYPES), "Params and computation in this dtype (default: as saved).")
_KV_CACHE = flags.DEFINE_enum("kv_cache", None, list(KV_CACHE_CHOICES),
                              "KV-cache storage: float (the compute dtype), int8 or fp8 (default: as trained).")
flags.mark_flag_as_required("checkpoint")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    loaded = load(_CHECKPOINT.value, step=_STEP.value, dtype=_DTYPE.value)
    model = with_kv_cache_quant(loaded.model, _KV_CACHE.value)
    texts = generate_text(model, loaded.params, loaded.tokenizer, _PROMPT.value,
                          max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                          top_p=_TOP_P.value, min_p=_MIN_P.value, repetition_penalty=_REPETITION_PENALTY.value,
                          seed=_SEED.value)
    print(f"# {loaded.source}", file=sys.stderr)
    for i, (prompt, text) in enumerate(zip(_PROMPT.value, texts)):
        print(("---\n" if i else "") + prompt + text)


if __name__ == "__main__":
    cli.run(main)  # errors as one line `error: ...`, library logs behind --verbose
