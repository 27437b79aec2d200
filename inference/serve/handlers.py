"""The generation endpoints: POST /v1/completions and /v1/chat/completions, one-shot or SSE.

Chat requests are rendered with the model's chat template (`data.chat`), after the optional
hooks: `tools` through `agents.calls.with_tools` (and the answer through `parse_tool_calls`,
finish_reason "tool_calls"), retrieval (`rag.generate.rag_messages`, the answer's
`citations`) and moderation of the input and the output (`safety.moderation`, finish_reason
"content_filter"). With tools or a moderator the answer is checked whole before it is sent,
so a stream then arrives as one piece.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from data import chat as chat_lib
from inference.serve.generation import Choice, Run, usage
from inference.serve.hooks import Hooks
from inference.serve.protocol import APIError, ChatRequest, CompletionRequest
from inference.serve.text import chat_logprobs, completion_logprobs
from inference.serve.worker import EngineLoop

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions endpoint
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _disconnected(request: HTTPRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(coroutine, request: HTTPRequest):
    """Runs `coroutine`; if the client goes away first, cancels it (freeing its slots)."""
    task, watcher = asyncio.ensure_future(coroutine), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return task.result()  # raises CancelledError when the client left (nobody reads the answer)


class Handlers:
    """What the generation endpoints share: the loaded model, the engine loop, the hooks."""

    def __init__(self, loaded, loop: EngineLoop, *, model_name: str, timeout_s: float, chat_template: str | None,
                 hooks: Hooks):
        self.tokenizer, self.loop, self.model_name = loaded.tokenizer, loop, model_name
        self.timeout_s, self.chat_template, self.hooks = timeout_s, chat_template, hooks
        self.max_len = loop.engine.max_len
        self.eos = () if self.tokenizer.eos_id is None else (self.tokenizer.eos_id,)
        template = chat_lib.resolve_template(self.tokenizer, chat_template) if self._has_template() else ""
        self.turn_tokens, self.turn_stops = [], []
        for marker in (m for m in END_OF_TURN if m in template):
            ids = self.tokenizer.encode(marker)
            (self.turn_tokens.extend(ids) if len(ids) == 1 else self.turn_stops.append(marker))

    def _has_template(self) -> bool:
        return bool(self.chat_template or getattr(self.tokenizer, "chat_template", None))

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def prompt_ids(self, prompt) -> list[list[int]]:
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            if min(prompt) < 0 or max(prompt) >= self.loop.engine.model.config.vocab_size:
                raise APIError(400, "prompt token ids must lie in [0, vocab_size)", param="prompt")
            return [prompt]
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not texts:
            raise APIError(400, "prompt is empty", param="prompt")
        start = [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []
        ids = [start + self.tokenizer.encode(t) for t in texts]
        if any(not p for p in ids) and not self.eos:
            raise APIError(400, "an empty prompt needs a bos or eos token and the tokenizer has neither",
                           param="prompt")
        return [p or list(self.eos) for p in ids]

    def run(self, body, prompts: list[list[int]], *, max_tokens: int | None, default_max: int | None,
            logprobs: int | None, stop_tokens, stops) -> Run:
        longest = max(len(p) for p in prompts)
        room = self.max_len - longest
        if room < 1:
            raise APIError(400, f"the prompt has {longest} tokens, which fills the context of {self.max_len}; "
                           "shorten it", param="messages" if isinstance(body, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        max_tokens = max_tokens or min(default_max or room, room)
        if longest + max_tokens > self.max_len:
            raise APIError(400, f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                           f"{self.max_len} tokens; lower max_tokens", param="max_tokens",
                           code="context_length_exceeded")
        settings = {"temperature": body.temperature, "top_p": body.top_p if body.top_p < 1 else None,
                    "top_k": body.top_k if body.top_k and body.top_k > 0 else None,
                    "min_p": body.min_p or None, "repetition_penalty": body.repetition_penalty}
        seed = body.seed if body.seed is not None else random.randrange(2**31)
        return Run(self.loop, self.tokenizer, prompts=prompts, n=body.n, max_tokens=max_tokens, settings=settings,
                   seed=seed, stops=[*body.stops, *stops], stop_tokens=[*self.eos, *stop_tokens],
                   logprobs=logprobs, timeout_s=self.timeout_s)

    # ------------------------------------------------------------------ completions

    async def completions(self, body: CompletionRequest, request: HTTPRequest):
        self.check_model(body.model)
        run = self.run(body, self.prompt_ids(body.prompt), max_tokens=body.max_tokens,
                       default_max=COMPLETIONS_DEFAULT_MAX_TOKENS, logprobs=body.logprobs, stop_tokens=(), stops=())
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        if body.stream:
            return StreamingResponse(self._stream_completions(run, head, body), media_type="text/event-stream")
        choices = await _unless_disconnected(run.collect(), request)
        return {**head, "object": "text_completion", "usage": usage(run), "choices": [
            {"index": i, "text": c.text, "finish_reason": c.finish_reason,
             "logprobs": completion_logprobs(self.tokenizer, c.entries) if body.logprobs is not None else None}
            for i, c in enumerate(choices)]}

    async def _stream_completions(self, run: Run, head: dict, body) -> AsyncIterator[str]:
        head = {**head, "object": "text_completion"}
        offsets = [0] * len(run.tickets)
        try:
            async for index, delta, entries, finish in run.events():
                logprobs = None
                if body.logprobs is not None:
                    logprobs = completion_logprobs(self.tokenizer, entries, offsets[index])
                    offsets[index] += sum(len(t) for t in logprobs["tokens"])
                if delta or finish or entries:
                    yield _sse({**head, "choices": [{"index": index, "text": delta, "logprobs": logprobs,
                                                     "finish_reason": finish}], "usage": None})
            if body.stream_options and body.stream_options.include_usage:
                yield _sse({**head, "choices": [], "usage": usage(run)})
        except APIError as e:
            yield _sse(e.body())
        yield _sse("[DONE]")

    # ------------------------------------------------------------------ chat

    async def _messages(self, body: ChatRequest) -> tuple[list[dict], list[dict] | None, str | None]:
        """The messages to render, the citations, and the refusal if the input was flagged."""
        messages = []
        for m in body.messages:
            extra = {k: v for k, v in (m.model_extra or {}).items() if k in ("name", "tool_calls", "tool_call_id")}
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": m.text(), **extra})
        if self.hooks.moderator is not None:
            texts = [m["content"] for m in messages if m["role"] == "user"]
            if texts and await self.hooks.flagged(texts):
                return messages, None, self.hooks.refusal()
        citations = None
        if self.hooks.rag_index is not None:
            messages, citations = await self.hooks.retrieve(messages)
        tools = self._tools(body)
        if tools:
            messages = self.hooks.with_tools(messages, tools)
        elif any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            messages = self.hooks.with_tools(messages, None)
        return messages, citations, None

    def _tools(self, body: ChatRequest) -> list[dict] | None:
        """The request's tools, else the server's (--tools); none when tool_choice is "none"."""
        return None if body.tool_choice == "none" else (body.tools or self.hooks.tools)

    async def chat(self, body: ChatRequest, request: HTTPRequest):
        self.check_model(body.model)
        if not self._has_template():
            raise APIError(400, "this model's tokenizer has no chat template; start the server with "
                           "--chat_template=chatml (or llama3, or a Jinja string), or use /v1/completions")
        messages, citations, refusal = await self._messages(body)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        if citations is not None:
            head["citations"] = citations
        if refusal is not None:
            return self._refused(body, head, refusal)
        try:
            ids, _ = chat_lib.render(self.tokenizer, messages, add_generation_prompt=True, template=self.chat_template)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        top = (body.top_logprobs or 0) if body.logprobs else None
        run = self.run(body, [ids], max_tokens=body.max_completion_tokens or body.max_tokens, default_max=None,
                       logprobs=top, stop_tokens=self.turn_tokens, stops=self.turn_stops)
        buffered = bool(self._tools(body)) or self.hooks.moderator is not None
        if body.stream and not buffered:
            return StreamingResponse(self._stream_chat(run, head, body), media_type="text/event-stream")
        choices = await _unless_disconnected(run.collect(), request)
        answers = [await self._answer(c, body) for c in choices]
        if body.stream:
            return StreamingResponse(self._replay_chat(run, head, body, answers), media_type="text/event-stream")
        return {**head, "object": "chat.completion", "usage": usage(run), "choices": [
            {"index": i, "message": message, "finish_reason": finish, "logprobs": logprobs}
            for i, (message, finish, logprobs) in enumerate(answers)]}

    async def _answer(self, choice: Choice, body: ChatRequest) -> tuple[dict, str, dict | None]:
        """(message, finish_reason, logprobs) of a finished choice, after tools and moderation."""
        message = {"role": "assistant", "content": choice.text}
        finish = choice.finish_reason
        if self._tools(body):
            content, calls = self.hooks.parse_tool_calls(choice.text)
            if calls:
                message, finish = {"role": "assistant", "content": content or None, "tool_calls": calls}, "tool_calls"
        if self.hooks.moderator is not None and await self.hooks.flagged([choice.text]):
            message, finish = {"role": "assistant", "content": self.hooks.refusal()}, "content_filter"
        logprobs = chat_logprobs(self.tokenizer, choice.entries) if body.logprobs else None
        return message, finish, logprobs

    def _refused(self, body: ChatRequest, head: dict, refusal: str):
        answers = [({"role": "assistant", "content": refusal}, "content_filter", None)] * body.n
        if body.stream:
            return StreamingResponse(self._replay_chat(None, head, body, answers), media_type="text/event-stream")
        return JSONResponse({**head, "object": "chat.completion", "choices": [
            {"index": i, "message": m, "finish_reason": f, "logprobs": None} for i, (m, f, _) in enumerate(answers)],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})

    async def _stream_chat(self, run: Run, head: dict, body: ChatRequest) -> AsyncIterator[str]:
        head = {**head, "object": "chat.completion.chunk"}
        for index in range(len(run.tickets)):
            yield _sse({**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}], "usage": None})
        try:
            async for index, delta, entries, finish in run.events():
                logprobs = chat_logprobs(self.tokenizer, entries) if body.logprobs else None
                if delta or finish or entries:
                    yield _sse({**head, "choices": [{"index": index, "delta": {"content": delta} if delta else {},
                                                     "logprobs": logprobs, "finish_reason": finish}], "usage": None})
            if body.stream_options and body.stream_options.include_usage:
                yield _sse({**head, "choices": [], "usage": usage(run)})
        except APIError as e:
            yield _sse(e.body())
        yield _sse("[DONE]")

    async def _replay_chat(self, run: Run | None, head: dict, body: ChatRequest, answers) -> AsyncIterator[str]:
        """A finished answer as a stream (tools or moderation needed the whole text first)."""
        head = {**head, "object": "chat.completion.chunk"}
        for index, (message, finish, logprobs) in enumerate(answers):
            if message.get("tool_calls"):  # a stream's tool calls carry their position
                message = {**message, "tool_calls": [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]}
            yield _sse({**head, "choices": [{"index": index, "delta": message, "logprobs": logprobs,
                                             "finish_reason": None}], "usage": None})
            yield _sse({**head, "choices": [{"index": index, "delta": {}, "logprobs": None,
                                             "finish_reason": finish}], "usage": None})
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({**head, "choices": [], "usage": usage(run) if run else
                        {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})
        yield _sse("[DONE]")
