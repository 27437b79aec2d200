"""Greedy decoding with the functions `inference/export.py` wrote, importing only jax and numpy.

This file is copied into every export directory and imports nothing from lmlab, so it
runs where lmlab (and flax) are not installed:

    python DIR/run_exported.py DIR --prompt_ids=5,17,3 --prompt_ids=9,2 --max_new_tokens=20

prints the new token ids of each prompt as a JSON list of lists. The loop is
`inference.generate`'s greedy loop: right-padded prompts, one prefill, then per step the
argmax of each row's logits is fed back at the row's own position.
"""

import argparse
import json
import os
import sys

import jax
import numpy as np


def load(directory: str):
    """(manifest, prefill, decode, params) of an export directory."""
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    functions = []
    for name in ("prefill.jax", "decode.jax"):
        with open(os.path.join(directory, name), "rb") as f:
            functions.append(jax.export.deserialize(bytearray(f.read())))
    params = {}
    bits_of = manifest.get("param_dtypes", {})  # leaves stored as bit patterns (bfloat16, float8)
    with np.load(os.path.join(directory, "params.npz")) as arrays:
        for key in arrays.files:  # "a/b/kernel" -> params["a"]["b"]["kernel"]
            *parents, leaf = key.split("/")
            node = params
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = arrays[key].view(jax.numpy.dtype(bits_of[key])) if key in bits_of else arrays[key]
    return manifest, functions[0], functions[1], params


def greedy(directory: str, prompts: list[list[int]], max_new_tokens: int,
           stop_tokens: tuple[int, ...] = ()) -> list[list[int]]:
    """The new token ids of each prompt (cut after its first stop token)."""
    manifest, prefill, decode, params = load(directory)
    vocab_size = manifest["vocab_size"]
    bad = sorted({t for p in prompts for t in p if not 0 <= t < vocab_size})
    if bad:  # the embedding lookup would clamp or read garbage rather than fail
        raise ValueError(f"prompt token ids {bad[:5]} are outside the model's vocabulary [0, {vocab_size}); "
                         f"pass ids of the tokenizer the model was trained with")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() < 1 or lengths.max() + max_new_tokens > manifest["max_len"]:
        raise ValueError(f"prompts of 1..{manifest['max_len'] - max_new_tokens} tokens fit max_new_tokens="
                         f"{max_new_tokens} in the exported cache of max_len={manifest['max_len']}")
    ids = np.full((len(prompts), lengths.max()), manifest["pad_id"], np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    logits, cache = prefill.call(params, ids, lengths)
    out = np.zeros((len(prompts), max_new_tokens), np.int32)
    done = np.zeros(len(prompts), bool)
    for step in range(max_new_tokens):
        tokens = np.where(done, manifest["pad_id"], np.argmax(np.asarray(logits), axis=-1)).astype(np.int32)
        out[:, step] = tokens
        done |= np.isin(tokens, stop_tokens)
        if done.all() or step == max_new_tokens - 1:
            break
        logits, cache = decode.call(params, cache, tokens, lengths + step)
    rows = []
    for row in out.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_tokens), max_new_tokens)
        rows.append(row[:cut])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", help="an export directory (inference/export.py)")
    parser.add_argument("--prompt_ids", action="append", required=True,
                        help="comma-separated token ids; repeat for a batch")
    parser.add_argument("--max_new_tokens", type=int, default=20)
    parser.add_argument("--stop_tokens", default="", help="comma-separated ids that end a row")
    args = parser.parse_args()
    try:
        prompts = [[int(t) for t in p.split(",")] for p in args.prompt_ids]
        stop = tuple(int(t) for t in args.stop_tokens.split(",") if t)
        print(json.dumps(greedy(args.directory, prompts, args.max_new_tokens, stop)))
    except ValueError as e:  # bad ids or lengths: one line, no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
