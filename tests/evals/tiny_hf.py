"""A small random Hugging Face LLaMA directory (config.json, model.safetensors, tokenizer.json with
a `<s>` bos template, tokenizer_config.json) for the harness's end-to-end tests: nothing is
downloaded, and both lmlab (`inference.load`) and transformers / lm-eval's `hf` backend read it."""

import json
from pathlib import Path

TEXT = ("The quick brown fox jumps over the lazy dog. Über naïve café! Assert statements are a convenient "
        "way to insert debugging assertions into a program. Pack my box with five dozen liquor jugs.\n") * 6


def save_tiny_llama(directory: Path, *, seed: int = 0, max_positions: int = 512) -> Path:
    """Writes the model and tokenizer into `directory`; returns it."""
    import tokenizers
    import torch
    import transformers
    from tokenizers import processors

    from data.tokenizer import ByteLevelBPE
    from data.tokenizer.hf_json import export_bpe

    bpe = ByteLevelBPE.train(TEXT, 300)
    export_bpe(bpe, directory / "tokenizer.json")
    tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.add_special_tokens(["<s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<|endoftext|>"}))
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=max_positions, bos_token_id=bos,
                                      eos_token_id=bpe.special_tokens["<|endoftext|>"], tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the init's 0.02: log-likelihoods that differ between choices
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.ndim == 1 and "norm" in name else 0.2 * torch.randn_like(p))
    model.eval().save_pretrained(directory, safe_serialization=True)
    return directory
