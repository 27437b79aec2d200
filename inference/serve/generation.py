"""From a validated request to engine requests and back to choices: n, seeds, stop strings,
logprobs, timeouts and cancellation, for both the one-shot and the streamed answer.

    run = Run(loop, tokenizer, prompts=[ids], n=2, settings={...}, stops=["\\n"], ...)
    async for index, delta, entries, finish in run.events(): ...   # streaming
    choices = await run.collect()                                   # one answer

Choice i of prompt p is engine request p * n + i, sampled with seed `seed + i` (so n
choices differ and each equals a request for that seed alone). Stop strings end a choice
at once: the engine request is cancelled and its slot freed. On timeout, on an exception
and when the consumer goes away (a disconnect cancels the handler task), every unfinished
engine request is cancelled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence

from inference.engine import Request
from inference.serve.protocol import APIError
from inference.serve.text import TextStream
from inference.serve.worker import EngineLoop, QueueFull


@dataclasses.dataclass
class Choice:
    text: str
    tokens: list[int]
    entries: list  # engine logprob entries, one per token (when asked)
    finish_reason: str


class Run:
    """The engine requests of one HTTP request."""

    def __init__(self, loop: EngineLoop, tokenizer, *, prompts: Sequence[Sequence[int]], n: int, max_tokens: int,
                 settings: dict, seed: int, stops: Sequence[str], stop_tokens: Sequence[int], logprobs: int | None,
                 timeout_s: float, retry_after_s: int = 1):
        self.loop, self.tokenizer, self.timeout_s = loop, tokenizer, timeout_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.streams, self.tickets = [], []
        self.tokens: list[list[int]] = []
        self.entries: list[list] = []
        self.finish: list[str | None] = []
        self.prompt_tokens = sum(len(p) for p in prompts) * n
        requests = [Request(list(p), max_tokens, stop_tokens=tuple(stop_tokens), seed=(seed + i) % 2**31,
                            logprobs=logprobs, **settings) for p in prompts for i in range(n)]
        try:
            for index, request in enumerate(requests):
                self.tickets.append(loop.submit(request, self.queue, index))
                self.streams.append(TextStream(tokenizer, stops=stops, hidden=stop_tokens))
                self.tokens.append([])
                self.entries.append([])
                self.finish.append(None)
        except QueueFull as e:
            self.cancel()
            raise APIError(429, f"the server is busy ({e}); retry later", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(retry_after_s)}) from None
        loop.metrics.prompt_tokens.inc(self.prompt_tokens)

    @property
    def completion_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    def cancel(self) -> None:
        for ticket in self.tickets:
            self.loop.cancel(ticket)

    def _end(self, index: int, reason: str) -> None:
        self.finish[index] = reason
        self.loop.cancel(self.tickets[index])  # no-op when the engine already finished it

    async def events(self) -> AsyncIterator[tuple[int, str, list, str | None]]:
        """(choice index, new text, new (token, logprob entry) pairs, finish reason or None)."""
        deadline = time.monotonic() + self.timeout_s
        try:
            while any(f is None for f in self.finish):
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        index, event = await self.queue.get()
                except TimeoutError:
                    raise APIError(408, f"the request took longer than the server's timeout of {self.timeout_s:g} "
                                   "s; ask for fewer tokens or raise --timeout_s", type="timeout_error",
                                   code="timeout") from None
                if event.error:  # requests are checked before submission: this is the server's fault
                    raise RuntimeError(event.error)
                if self.finish[index] is not None:
                    continue  # a choice already ended by a stop string
                self.tokens[index].append(event.token)
                new = [(event.token, event.logprobs)] if event.logprobs is not None else []
                self.entries[index] += new
                stream = self.streams[index]
                delta = stream.add(event.token)
                if stream.stopped or event.done:
                    stopped = stream.stopped or event.token in stream.hidden
                    delta += stream.finish()
                    self._end(index, "stop" if stopped else "length")
                yield index, delta, new, self.finish[index]
        finally:
            self.cancel()  # what is left unfinished (timeout, error, client gone)

    async def collect(self) -> list[Choice]:
        """Runs to the end; the choices in order."""
        async for _ in self.events():
            pass
        return [Choice(s.text, t, e, f) for s, t, e, f in zip(self.streams, self.tokens, self.entries, self.finish)]


def usage(run: Run) -> dict:
    return {"prompt_tokens": run.prompt_tokens, "completion_tokens": run.completion_tokens,
            "total_tokens": run.prompt_tokens + run.completion_tokens}
