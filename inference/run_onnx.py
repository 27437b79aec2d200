"""Greedy decoding with the ONNX graph `inference/onnx_export.py` wrote, importing only numpy and onnxruntime.

This file is copied into every ONNX export directory and imports nothing from lmlab:

    python DIR/run_onnx.py DIR --prompt_ids=5,17,3 --prompt_ids=9,2 --max_new_tokens=20

prints the new token ids of each prompt as a JSON list of lists. The loop is
`inference.generate`'s greedy loop: right-padded prompts in one prefill (attention_mask
hides the padding slots), then per step the argmax of each row's logits is fed back at
the row's own position while the cache grows by one slot.
"""

import argparse
import json
import os
import sys

import numpy as np
import onnxruntime as ort


def load(directory: str, providers=("CPUExecutionProvider",)):
    """(manifest, onnxruntime.InferenceSession) of an export directory."""
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(os.path.join(directory, "model.onnx"), options, providers=list(providers))
    return manifest, session


def empty_cache(manifest: dict, batch: int) -> dict:
    """past_key_values.{i}.key / .value of P = 0 past tokens."""
    shape = (batch, manifest["num_kv_heads"], 0, manifest["head_dim"])
    return {f"past_key_values.{i}.{kind}": np.zeros(shape, np.float32)
            for i in range(manifest["num_layers"]) for kind in ("key", "value")}


def step(session, manifest: dict, ids, positions, mask, cache: dict):
    """One call of the graph: (logits [B, T, V], the present cache as the next call's past)."""
    outputs = session.run(None, {"input_ids": ids, "position_ids": positions, "attention_mask": mask, **cache})
    names = [o.name for o in session.get_outputs()]
    present = dict(zip(names, outputs))
    return present["logits"], {name.replace("present.", "past_key_values."): value
                               for name, value in present.items() if name.startswith("present.")}


def greedy(directory: str, prompts: list[list[int]], max_new_tokens: int,
           stop_tokens: tuple[int, ...] = ()) -> list[list[int]]:
    """The new token ids of each prompt (cut after its first stop token)."""
    manifest, session = load(directory)
    vocab_size, pad = manifest["vocab_size"], manifest["pad_id"]
    bad = sorted({t for p in prompts for t in p if not 0 <= t < vocab_size})
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the model's vocabulary [0, {vocab_size}); "
                         f"pass ids of the tokenizer the model was trained with")
    lengths = np.array([len(p) for p in prompts], np.int64)
    if lengths.min() < 1 or lengths.max() + max_new_tokens > manifest["max_len"]:
        raise ValueError(f"prompts of 1..{manifest['max_len'] - max_new_tokens} tokens fit max_new_tokens="
                         f"{max_new_tokens} in the exported max_len={manifest['max_len']}")
    B, T = len(prompts), int(lengths.max())
    ids = np.full((B, T), pad, np.int64)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    positions = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy()
    logits, cache = step(session, manifest, ids, positions, mask, empty_cache(manifest, B))
    logits = logits[np.arange(B), lengths - 1]
    out = np.zeros((B, max_new_tokens), np.int64)
    done = np.zeros(B, bool)
    for t in range(max_new_tokens):
        tokens = np.where(done, pad, np.argmax(logits, axis=-1))
        out[:, t] = tokens
        done |= np.isin(tokens, stop_tokens)
        if done.all() or t == max_new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
        logits, cache = step(session, manifest, tokens[:, None], (lengths + t)[:, None], mask, cache)
        logits = logits[:, 0]
    rows = []
    for row in out.tolist():
        cut = next((i + 1 for i, tok in enumerate(row) if tok in stop_tokens), max_new_tokens)
        rows.append(row[:cut])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", help="an ONNX export directory (inference/onnx_export.py)")
    parser.add_argument("--prompt_ids", action="append", required=True,
                        help="comma-separated token ids; repeat for a batch")
    parser.add_argument("--max_new_tokens", type=int, default=20)
    parser.add_argument("--stop_tokens", default="", help="comma-separated ids that end a row")
    args = parser.parse_args()
    try:
        prompts = [[int(t) for t in p.split(",")] for p in args.prompt_ids]
        stop = tuple(int(t) for t in args.stop_tokens.split(",") if t)
        print(json.dumps(greedy(args.directory, prompts, args.max_new_tokens, stop)))
    except (ValueError, OSError) as e:  # bad ids, lengths or directory: one line, no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
