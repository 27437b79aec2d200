"""Serve a model over OpenAI's HTTP API: `python -m inference.serve --checkpoint=PATH`.

PATH is a `python -m train` workdir or a Hugging Face directory (`inference.load.load`).

    python -m inference.serve --checkpoint=/tmp/tiny --chat_template=chatml --port=8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "tiny", "prompt": "The ", "max_tokens": 20, "temperature": 0}'
"""

import sys

import uvicorn
from absl import app, flags

from inference.kv_quant import KV_CACHE_CHOICES
from inference.load import DTYPES, load
from inference.serve.app import MAX_BODY_BYTES, create_app
from inference.serve.hooks import Hooks
from train import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A `python -m train` workdir or a Hugging Face directory.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (loopback by default; 0.0.0.0 to expose it).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_API_KEY = flags.DEFINE_string("api_key", None, "If set, /v1 requests need `Authorization: Bearer KEY`.")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "The model id clients use (default: the directory's name).")
_NUM_SLOTS = flags.DEFINE_integer("num_slots", 8, "Requests decoded together (continuous batching).")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 64, "Requests that may wait for a slot; more get 429.")
_TIMEOUT_S = flags.DEFINE_float("timeout_s", 600.0, "Seconds one request may take before it is cancelled (408).")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "Positions per slot (prompt + new tokens); default the model's.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", None, "Paged KV cache block size (default: contiguous cache).")
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", MAX_BODY_BYTES, "The largest request body accepted (413).")
_CHAT_TEMPLATE = flags.DEFINE_string("chat_template", None,
                                     "chatml, llama3 or a Jinja string (default: the tokenizer's own).")
_EMBEDDING_MODEL = flags.DEFINE_string("embedding_model", None, "A sentence-transformers directory: /v1/embeddings.")
_RAG_INDEX = flags.DEFINE_string("rag_index", None, "A saved rag.index.Index: chat answers from retrieved sources.")
_RAG_K = flags.DEFINE_integer("rag_k", 3, "Passages retrieved per chat request.")
_MODERATION = flags.DEFINE_string("moderation", None, "A moderation model dir or module.path:attr (safety).")
_TOOLS = flags.DEFINE_string("tools", None, "pkg.mod:attr,... user tools offered to chat requests without `tools`.")
_STEP = flags.DEFINE_integer("step", None, "The workdir checkpoint step (default: the latest).")
_DTYPE = flags.DEFINE_enum("dtype", None, list(DTYPES), "Params and computation in this dtype (default: as saved).")
_KV_CACHE = flags.DEFINE_enum("kv_cache", None, list(KV_CACHE_CHOICES),
                              "KV-cache storage: float (the compute dtype), int8 or fp8 (default: as trained).")
flags.mark_flag_as_required("checkpoint")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not 0 <= _PORT.value < 65536:
        raise ValueError(f"--port={_PORT.value} must be in [0, 65535]")
    for name, value in (("num_slots", _NUM_SLOTS.value), ("timeout_s", _TIMEOUT_S.value),
                        ("max_body_bytes", _MAX_BODY.value)):
        if value <= 0:
            raise ValueError(f"--{name}={value} must be > 0")
    if _MAX_QUEUE.value < 0:
        raise ValueError(f"--max_queue={_MAX_QUEUE.value} must be >= 0")
    if _API_KEY.value is not None and not _API_KEY.value:
        raise ValueError("--api_key is empty; give a key or leave the flag out")
    hooks = Hooks.load(embedding_model=_EMBEDDING_MODEL.value, rag_index=_RAG_INDEX.value, rag_k=_RAG_K.value,
                       moderation=_MODERATION.value, tools=_TOOLS.value)
    loaded = load(_CHECKPOINT.value, step=_STEP.value, dtype=_DTYPE.value)
    server = create_app(loaded, model_name=_MODEL_NAME.value, num_slots=_NUM_SLOTS.value,
                        max_queue=_MAX_QUEUE.value, timeout_s=_TIMEOUT_S.value, api_key=_API_KEY.value,
                        max_body_bytes=_MAX_BODY.value, chat_template=_CHAT_TEMPLATE.value, max_len=_MAX_LEN.value,
                        block_size=_BLOCK_SIZE.value, kv_cache=_KV_CACHE.value, hooks=hooks)
    print(f"# {loaded.source}; serving on http://{_HOST.value}:{_PORT.value}", file=sys.stderr)
    uvicorn.run(server, host=_HOST.value, port=_PORT.value, log_level="warning")


if __name__ == "__main__":
    cli.run(main)  # errors as one line `error: ...`, library logs behind --verbose
