"""The teacher's sequences of sequence-level distillation (Kim & Rush 2016; `distill.mode=sequence`).

    prompts = prompts_from(data_cfg, tokenizer, num_prompts=256, prompt_tokens=32, seed=0)
    write_teacher_sequences(path, loaded_teacher, prompts, max_new_tokens=96, temperature=0.0, seed=0)

The prompts are the first tokens of training documents; the teacher continues each (after the
document separator the pipeline starts documents with) through `inference.generate`, greedy or
sampled, and prompt + continuation are written as JSONL `{"text": ...}` lines, which the student
then reads as packed text (`sequence_data_config`). The file's name (`sequence_file`) is a digest
of everything that makes it, so a run with other settings never reads another's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from data import pipeline


def sequence_file(config) -> str:
    """The name of a run's teacher sequences: distill/teacher_sequences_<digest>.jsonl, the
    digest of what makes them (teacher, prompts, generation, seed, source), so that a run with
    other settings never reads another's."""
    d = config.distill
    made_of = json.dumps([d.teacher, d.num_prompts, d.prompt_tokens, d.max_new_tokens, d.sample_temperature,
                          config.seed, config.data.source, config.data.text_key], sort_keys=True)
    return os.path.join("distill", f"teacher_sequences_{hashlib.sha256(made_of.encode()).hexdigest()[:12]}.jsonl")


def sequence_data_config(data_cfg: pipeline.DataConfig, name: str) -> pipeline.DataConfig:
    """`data_cfg` reading the teacher's sequences (JSONL `text`, under data_dir) instead of the
    run's source."""
    return dataclasses.replace(data_cfg, source=f"files:{os.path.join(data_cfg.data_dir, name)}", text_key="text",
                               split_paragraphs=False)


def prompts_from(data_cfg: pipeline.DataConfig, tokenizer, *, num_prompts: int, prompt_tokens: int,
                 seed: int) -> list[list[int]]:
    """The first `prompt_tokens` ids of `num_prompts` training documents (those that have as
    many), in an order seeded by `seed`."""
    documents = pipeline.open_split(data_cfg, data_cfg.train_split)
    prompts = []
    for i in np.random.default_rng(seed).permutation(len(documents)):
        ids = tokenizer.encode(documents[int(i)])
        if len(ids) >= prompt_tokens:
            prompts.append(ids[:prompt_tokens])
            if len(prompts) == num_prompts:
                break
    if not prompts:
        raise ValueError(f"config key `distill.prompt_tokens`={prompt_tokens}: no training document has that many "
                         "tokens; lower it")
    return prompts


def write_teacher_sequences(path: str, loaded, prompts: list[list[int]], *, max_new_tokens: int,
                            temperature: float, seed: int, batch_size: int = 64) -> int:
    """Continues every prompt with the teacher (`inference.generate.generate`, after the
    document separator the pipeline starts documents with) and writes prompt + continuation as
    JSONL lines {"text": ...} to `path` (atomically); returns the lines written."""
    from inference.generate import generate

    tokenizer, model = loaded.tokenizer, loaded.model
    start = tokenizer.eos_id if tokenizer.bos_id is None else tokenizer.bos_id
    stop = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    new = min(max_new_tokens, model.config.max_len - 1 - max(len(p) for p in prompts))
    if new < 1:
        raise ValueError(f"config key `distill.prompt_tokens`={max(len(p) for p in prompts)} fills the teacher's "
                         f"context of {model.config.max_len}; lower it")
    lines = []
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first:first + batch_size]
        outs = generate(model, loaded.params, [[start] + p for p in chunk], max_new_tokens=new,
                        temperature=temperature, stop_tokens=stop, seed=seed + first)
        for prompt, out in zip(chunk, outs):
            lines.append({"text": tokenizer.decode(prompt + [t for t in out if t not in stop])})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    os.replace(path + ".tmp", path)
    return len(lines)
