"""A tiny model for the server's tests: a random Llama saved as a Hugging Face directory
(transformers' own save, the byte-level BPE exported as tokenizer.json), loaded once per session."""

import numpy as np
import pytest
import torch
import transformers

from data.tokenizer import ByteLevelBPE
from data.tokenizer.hf_json import export_bpe
from inference.load import load

TEXT = ("The cache holds the keys and the values of every token seen so far. " * 3
        + "A request joins a free slot; the others keep decoding. ") * 4


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A 2-layer Llama (vocab 300, 1024 positions; most test servers use 128) with weights large enough
    for clear greedy margins."""
    path = tmp_path_factory.mktemp("tiny_llama")
    bpe = ByteLevelBPE.train(TEXT, 300)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=bpe.vocab_size, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024, bos_token_id=None, eos_token_id=None)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.2 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    export_bpe(bpe, path / "tokenizer.json")
    return str(path)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_hf_dir):
    loaded = load(tiny_hf_dir)
    assert np.isfinite(np.asarray(loaded.params["embed"]["embedding"] if "embed" in loaded.params else 0.0)).all()
    return loaded
