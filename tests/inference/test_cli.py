"""`python -m inference` (inference/__main__.py, inference/load.py): continues a prompt from a
`python -m train` workdir and from a Hugging Face directory; other paths are named errors.

The HF case is checked against transformers: the CLI's greedy text equals the text of
transformers' greedy generate on the same weights and tokenizer.json.
"""

import os
import subprocess
import sys

import pytest
import torch
import transformers

from configs.loader import load_config
from data.tokenizer import ByteLevelBPE
from data.tokenizer.hf_json import export_bpe
from inference.generate import generate_text
from inference.load import load
from train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = ("The cache holds the keys and the values of every token seen so far. " * 3
        + "A request joins a free slot; the others keep decoding. ") * 4


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "inference", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env, check=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A 3-step tiny GPT run (the tokenizer trained into the workdir, as `python -m train` does)."""
    root = tmp_path_factory.mktemp("run")
    config = load_config(os.path.join(REPO, "configs/gpt.py:tiny"),
                         ["steps=3", "schedule.warmup_steps=1", "logging.progress_bar=false", "logging.peak_flops=1e11", "eval.num_samples=1",
                          "eval.sample_tokens=2", "eval.max_batches=1", "checkpoint.async_save=false"])
    trainer.run(config, str(root))
    return str(root)


def test_cli_continues_a_prompt_from_a_train_workdir(workdir):
    loaded = load(workdir)
    assert "step 3" in loaded.source
    texts = generate_text(loaded.model, loaded.params, loaded.tokenizer, ["The ", "A"], max_new_tokens=12)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)

    result = _cli(f"--checkpoint={workdir}", "--prompt=The ", "--max_new_tokens=12")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "The " + texts[0] + "\n"  # the CLI prints the prompt and its greedy continuation
    assert "step 3" in result.stderr

    sampled = generate_text(loaded.model, loaded.params, loaded.tokenizer, ["The "], max_new_tokens=12,
                            temperature=1.0, top_k=50, top_p=0.95, seed=1)
    assert sampled[0] != texts[0]


def test_cli_continues_a_prompt_from_a_hugging_face_directory(tmp_path):
    bpe = ByteLevelBPE.train(TEXT, 300)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=bpe.vocab_size, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, bos_token_id=None, eos_token_id=None)
    reference = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger than the init's 0.02, so that the greedy choice has clear margins
        for p in reference.parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.2 * torch.randn_like(p))
    reference.save_pretrained(tmp_path, safe_serialization=True)
    export_bpe(bpe, tmp_path / "tokenizer.json")

    eos = bpe.special_tokens["<|endoftext|>"]
    ids = [eos] + bpe.encode("The cache")  # generate_text starts from the bos (here <|endoftext|>)
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=10,
                                 eos_token_id=eos, pad_token_id=eos)
    theirs = bpe.decode([t for t in out[0, len(ids):].tolist() if t != eos])

    result = _cli(f"--checkpoint={tmp_path}", "--prompt=The cache", "--max_new_tokens=10")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "The cache" + theirs + "\n"
    assert "Hugging Face" in result.stderr


def test_a_path_that_is_neither_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a `python -m train` workdir"):
        load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load(str(tmp_path / "missing"))
    result = _cli(f"--checkpoint={tmp_path}", "--prompt=hi")
    assert result.returncode == 1 and "error:" in result.stderr and "neither" in result.stderr
