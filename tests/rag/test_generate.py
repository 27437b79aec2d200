"""rag.generate: prompts with numbered sources, citation records, and answer() on a tiny random
Llama (a Hugging Face directory) equal to transformers' greedy generate on the same rendered prompt;
`python -m rag build | ask` end to end and its one-line errors."""

import dataclasses
import json

import pytest
import torch
import transformers

from data import chat
from data.tokenizer import ByteLevelBPE
from data.tokenizer.hf_json import export_bpe
from inference.load import load
from rag.generate import SYSTEM, answer, citations, cited, rag_messages
from rag.index import Index
from tests.cli_output import assert_one_line_error, run_module
from tests.minilm import minilm_path

TEXT = ("Sources say the pass statement does nothing. A loop ends with break. Answer and cite [1] or [2]. " * 6)
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def index(embedder, corpus):
    return Index.build(embedder, corpus[1], kind="flat", vectors_ND=corpus[2])


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    """A random 2-layer Llama with a byte-level BPE holding ChatML's tokens, saved as a HF directory."""
    directory = tmp_path_factory.mktemp("llama")
    bpe = ByteLevelBPE.train(TEXT, 320, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=bpe.vocab_size, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=2048, bos_token_id=None, eos_token_id=None)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger than the init's 0.02: clear greedy margins
        for p in model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.2 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    export_bpe(bpe, directory / "tokenizer.json")
    return directory, model


def test_messages_number_the_sources_in_rank_order(index):
    hits = index.search(["What does pass do?"], 3)[0]
    system, user = rag_messages("What does pass do?", hits)
    assert system == {"role": "system", "content": SYSTEM}
    assert user["role"] == "user" and user["content"].endswith("Question: What does pass do?")
    positions = [user["content"].index(f"[{n}] ({hit.chunk.doc_id}) {hit.chunk.text.strip()}")
                 for n, hit in enumerate(hits, 1)]
    assert positions == sorted(positions) and "cite them as [n]" in user["content"]
    assert rag_messages("q", hits, system="Be brief.")[0]["content"] == "Be brief."
    records = citations(hits)
    assert [r["index"] for r in records] == [1, 2, 3]
    assert [(r["doc_id"], r["text"], r["char_start"]) for r in records] == [
        (h.chunk.doc_id, h.chunk.text, h.chunk.char_start) for h in hits]
    json.dumps(records)
    assert cited("As [2] says, and [1]; not [7], again [2].", 3) == [2, 1]
    with pytest.raises(ValueError, match="non-empty"):
        rag_messages("  ", hits)


def test_answer_equals_transformers_greedy_on_the_rag_prompt(decoder_dir, index):
    directory, reference = decoder_dir
    loaded = load(str(directory))
    question = "What does the pass statement do?"
    result = answer(loaded, index, question, k=2, max_new_tokens=NEW_TOKENS)
    hits = index.search([question], 2)[0]
    assert result.citations == citations(hits) and len(result.hits) == 2
    ids, _ = chat.render(loaded.tokenizer, rag_messages(question, hits), add_generation_prompt=True, template="chatml")
    stop = [loaded.tokenizer.encode_with_offsets("<|im_end|>")[0][0], loaded.tokenizer.eos_id]  # end of turn, eos
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                 eos_token_id=stop, pad_token_id=stop[0])[0, len(ids):].tolist()
    assert result.text == loaded.tokenizer.decode([t for t in out if t not in stop])
    assert result.cited == cited(result.text, 2)


def test_answer_drops_sources_that_do_not_fit_the_context(decoder_dir, index):
    loaded = load(str(decoder_dir[0]))
    ids, _ = chat.render(loaded.tokenizer, rag_messages("What is pass?", index.search(["What is pass?"], 1)[0]),
                         add_generation_prompt=True, template="chatml")
    loaded.model = loaded.model.clone(config=dataclasses.replace(loaded.model.config, max_len=len(ids) + 4))
    result = answer(loaded, index, "What is pass?", k=3, max_new_tokens=4)
    assert len(result.citations) == 1


def test_cli_build_and_ask(tmp_path, decoder_dir):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate([
        "The pass statement is a null operation; nothing happens when it executes.",
        "The break statement terminates the nearest enclosing loop.",
        "Assert statements insert debugging assertions into a program."])) + "\n")
    out = tmp_path / "index"
    model = str(minilm_path())
    built = run_module("rag", "build", f"--docs={docs}", f"--embedding_model={model}", f"--out={out}")
    assert built.returncode == 0, built.stderr[-3000:]
    assert "3 chunks of 3 documents" in built.stdout
    manifest = (out / "manifest.json").read_text()
    again = run_module("rag", "build", f"--docs={docs}", f"--embedding_model={model}", f"--out={out}")
    assert_one_line_error(again, "already exists", "--overwrite")
    assert (out / "manifest.json").read_text() == manifest
    asked = run_module("rag", "ask", f"--index={out}", f"--checkpoint={decoder_dir[0]}",
                       "--question=What does break do?", "--k=2", "--max_new_tokens=6")
    assert asked.returncode == 0, asked.stderr[-3000:]
    record = json.loads(asked.stdout.strip().splitlines()[-1])
    assert [c["index"] for c in record["citations"]] == [1, 2] and record["citations"][0]["doc_id"] == "d1"
    assert_one_line_error(run_module("rag", "ask", f"--index={tmp_path / 'nope'}", f"--checkpoint={tmp_path}",
                                     "--question=q"), "does not exist")
    assert_one_line_error(run_module("rag", "build", "--docs=embedded", f"--out={tmp_path / 'x'}"),
                          "--embedding_model")
