"""Token ids -> the text a client sees: incremental decoding with stop strings cut out.

    out = TextStream(tokenizer, stops=["\\n\\n"], hidden={eos})
    for token in tokens:
        delta = out.add(token)      # new text safe to send (held back: a partial stop string,
        if out.stopped: break       #  an incomplete UTF-8 character)
    delta = out.finish()

The text is always `tokenizer.decode(all visible ids)` cut at the earliest stop string (as
OpenAI cuts it: the stop string itself is not returned), so what the stream sends adds up
to exactly what the non-streaming answer holds.
"""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    """The text of one choice as its tokens arrive."""

    def __init__(self, tokenizer, *, stops: Sequence[str] = (), hidden: Sequence[int] = ()):
        self.tokenizer, self.stops, self.hidden = tokenizer, list(stops), set(hidden)
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already handed out
        self.text = ""
        self.stopped = False  # a stop string was found

    def add(self, token: int) -> str:
        """Adds a token; returns the text that became final."""
        if self.stopped:
            return ""
        if token not in self.hidden:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._take(len(self.text))
        self.text = text
        safe = len(text) - self._held_back(text)
        return self._take(safe)

    def finish(self) -> str:
        """The rest of the text (the generation ended)."""
        return self._take(len(self.text))

    def _held_back(self, text: str) -> int:
        """Characters at the end that may still change: an undecodable tail or a stop string's prefix."""
        held = 1 if text.endswith("\ufffd") else 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    held = max(held, k)
                    break
        return held

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:upto], upto
        return delta


def token_text(tokenizer, token: int) -> str:
    """One token's text, as logprobs name it."""
    return tokenizer.decode([token])


def completion_logprobs(tokenizer, entries, offset: int = 0) -> dict:
    """OpenAI's completions `logprobs` object from engine entries [(logprob, [(id, logprob)])] + the ids."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token, (chosen, alternatives) in entries:
        text = token_text(tokenizer, token)
        offsets.append(offset)
        offset += len(text)
        tokens.append(text)
        token_logprobs.append(chosen)
        alternatives_by_text = {}
        for i, v in alternatives:  # most likely first: tokens that decode alike keep the best value
            alternatives_by_text.setdefault(token_text(tokenizer, i), v)
        top.append(alternatives_by_text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokenizer, entries) -> dict:
    """OpenAI's chat `logprobs` object ({"content": [...]}) from (id, engine entry) pairs."""
    def item(token, value):
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    return {"content": [{**item(token, chosen), "top_logprobs": [item(i, v) for i, v in alternatives]}
                        for token, (chosen, alternatives) in entries]}
