"""Generation with retrieved context and numbered citations.

The retrieved chunks become numbered sources [1]..[k] (best first) in the user turn, after an
instruction to answer from them and cite them as [n]; the conversation is rendered with the
model's chat template (`data.chat`, ChatML when the tokenizer has none) and continued greedily
or sampled by `inference.generate` until the template's end of turn or EOS.

    hits = index.search([question], k=3)[0]
    messages = rag_messages(question, hits)            # what a chat model (or the server) is given
    result = answer(loaded, index, question, k=3)      # loaded: inference.load.load(checkpoint)
    result.text, result.citations, result.cited        # answer, the sources, the [n] it cited
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

SYSTEM = ("You are a helpful assistant. Answer the question using only the numbered sources. Cite the sources "
          "you use as [n]. If the sources do not contain the answer, say so.")
_CITATION = re.compile(r"\[(\d+)\]")


def format_sources(hits: Sequence) -> str:
    """The sources block: "[1] (doc_id) text" per hit, in rank order, separated by blank lines."""
    return "\n\n".join(f"[{n}] ({hit.chunk.doc_id}) {hit.chunk.text.strip()}" for n, hit in enumerate(hits, 1))


def rag_messages(question: str, hits: Sequence, *, system: str | None = None) -> list[dict]:
    """Chat messages asking `question` over the numbered sources of `hits`.

    Args:
      question: the user's question.
      hits: retrieved `rag.index.Hit`s, best first; hit i becomes source [i] (1-based).
      system: the system prompt (default `SYSTEM`).

    Returns:
      [{"role": "system", ...}, {"role": "user", ...}]: the user turn holds the sources, the
      instruction to cite them as [n] and the question.
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question must be a non-empty string")
    sources = format_sources(hits) if hits else "(no sources were found)"
    user = (f"Sources:\n{sources}\n\nAnswer the question using the sources above and cite them as [n], "
            f"for example [1].\nQuestion: {question.strip()}")
    return [{"role": "system", "content": SYSTEM if system is None else system}, {"role": "user", "content": user}]


def citations(hits: Sequence) -> list[dict]:
    """The sources as JSON-able records: [{"index": n, "doc_id", "source", "text", "score",
    "char_start", "char_end"}], n = 1..k in rank order (what [n] in the answer refers to)."""
    return [{"index": n, "doc_id": hit.chunk.doc_id, "source": hit.chunk.source, "text": hit.chunk.text,
             "score": float(hit.score), "char_start": hit.chunk.char_start, "char_end": hit.chunk.char_end}
            for n, hit in enumerate(hits, 1)]


def cited(text: str, num_sources: int) -> list[int]:
    """The source numbers [n] that `text` cites, in first-cited order, ignoring n outside 1..num_sources."""
    found = (int(m.group(1)) for m in _CITATION.finditer(text))
    return list(dict.fromkeys(n for n in found if 1 <= n <= num_sources))


@dataclasses.dataclass(frozen=True)
class Answer:
    """A generated answer: its text, the sources it was given (`citations`), the numbers it cited,
    and the hits themselves."""

    text: str
    citations: list[dict]
    cited: list[int]
    hits: list


def prompt_ids(tokenizer, messages: list[dict], template: str = "") -> tuple[list[int], tuple[int, ...], str]:
    """(prompt ids, stop token ids, end-of-turn text) of a conversation for generation."""
    from data import chat
    from data import sft as sft_data

    template = sft_data.chat_template(tokenizer, template)
    ids, _ = chat.render(tokenizer, messages, add_generation_prompt=True, template=template)
    end = sft_data.end_of_turn(tokenizer, template)
    stop = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    if end:
        end_ids = tokenizer.encode_with_offsets(end)[0]
        if len(end_ids) == 1:  # a special token: generation can stop on it
            stop.add(end_ids[0])
    return list(ids), tuple(sorted(stop)), end


def answer(loaded, index, question: str, k: int = 3, *, max_new_tokens: int = 128, template: str = "",
           system: str | None = None, **sampling) -> Answer:
    """Retrieves k chunks for `question` and generates an answer citing them.

    Args:
      loaded: an `inference.load.Loaded` decoder (model, params, tokenizer).
      index: a `rag.index.Index`.
      question: the question.
      k: sources retrieved; the lowest-ranked are dropped if the prompt would not leave
        `max_new_tokens` of room in the model's context (at least one is kept).
      max_new_tokens: the most tokens generated.
      template: the chat template ('' : the tokenizer's, else ChatML; or 'chatml', 'llama3', Jinja).
      system: the system prompt (default `SYSTEM`).
      **sampling: temperature, top_k, top_p, min_p, repetition_penalty, seed of
        `inference.generate.generate` (greedy by default).

    Returns:
      An `Answer`.
    """
    from inference.generate import generate

    tokenizer, max_len = loaded.tokenizer, loaded.model.config.max_len
    hits = index.search([question], k)[0]
    while True:
        ids, stop, end = prompt_ids(tokenizer, rag_messages(question, hits, system=system), template)
        if len(ids) + max_new_tokens <= max_len or len(hits) <= 1:
            break
        hits = hits[:-1]
    room = min(max_new_tokens, max_len - len(ids))
    if room < 1:
        raise ValueError(f"the prompt with one source has {len(ids)} tokens, filling the model's context of "
                         f"max_len={max_len}; build the index with a smaller chunk window")
    out = generate(loaded.model, loaded.params, [ids], max_new_tokens=room, stop_tokens=stop, **sampling)[0]
    text = tokenizer.decode([t for t in out if t not in stop])
    if end and end in text:
        text = text[:text.index(end)]
    return Answer(text, citations(hits), cited(text, len(hits)), hits)
