"""The agent loop: ask the model, run the tool calls it makes (allow-listed), feed back the results.

    transcript = run_agent(local_chat(model, params, tokenizer), messages, registry, max_steps=5)
    transcript.answer, transcript.stop_reason, transcript.to_dict()

`chat(messages, tools)` is any function returning an assistant message {"content", "tool_calls"} in
OpenAI's format: `local_chat` generates in-process with lmlab's model; an `openai` client pointed
at `python -m inference.serve` works the same (`openai_chat`).

Security, in layers that hold even when the model is fooled (tests drive the loop with a scripted
`chat` that obeys injected instructions):
  * a call to a tool outside the registry's allow-list is refused, never executed, and recorded;
    by default the run then stops with stop_reason "refused";
  * tool outputs reach the model only inside `<tool_response>` blocks, with the markers they could
    use to break out escaped (`agents.calls.with_tools`);
  * an answer that repeats the system prompt (any `LEAK_WORDS` consecutive words of it, or all of
    a shorter one) is withheld: the content becomes `REFUSAL` and stop_reason "refused".
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from agents import calls
from agents.tools import ToolError, ToolRefused, ToolRegistry

STOP_REASONS = ("answered", "step_limit", "refused")
REFUSAL = "I can't share that."
LEAK_WORDS = 8

Chat = Callable[[list[dict], list[dict]], dict]


@dataclasses.dataclass
class Transcript:
    """Everything one run did, JSON-serializable (`to_dict`).

    Attributes:
      messages: the whole conversation in OpenAI's format: the input, each assistant turn (with its
        `tool_calls`) and each tool result ({"role": "tool", "tool_call_id", "content"}).
      tool_calls: one record per call: id, name, arguments (the JSON string the model wrote),
        status ("ok" | "error" | "refused"), result (the text the model read back).
      stop_reason: "answered" | "step_limit" | "refused".
      steps: the model calls made.
      answer: the final assistant content ("" unless answered; REFUSAL when withheld).
    """

    messages: list[dict]
    tool_calls: list[dict] = dataclasses.field(default_factory=list)
    stop_reason: str = ""
    steps: int = 0
    answer: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, **kwargs)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def leaks_system_prompt(answer: str, system_prompts: Sequence[str], *, window: int = LEAK_WORDS) -> bool:
    """Whether `answer` repeats a system prompt: `window` consecutive words of one (case and
    punctuation ignored), or all of a prompt shorter than that."""
    said = " " + " ".join(_words(answer)) + " "
    for prompt in system_prompts:
        words = _words(prompt)
        if not words:
            continue
        size = min(window, len(words))
        if any(" " + " ".join(words[i:i + size]) + " " in said for i in range(len(words) - size + 1)):
            return True
    return False


def _run_call(call: dict, registry: ToolRegistry) -> tuple[str, str]:
    """(status, result text) of one OpenAI tool call."""
    function = call.get("function") or {}
    name, raw = function.get("name", ""), function.get("arguments", "{}")
    if not registry.allowed(name):
        return "refused", f"error: tool {name!r} is not allowed; the allowed tools are {registry.names}"
    try:
        arguments = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return "error", f"error: the arguments of {name} are not valid JSON: {raw!r:.80}"
    try:
        return "ok", registry.call(name, arguments)
    except ToolRefused as e:
        return "refused", f"error: {e}"
    except ToolError as e:
        return "error", f"error: {e}"


def _advance(transcript: Transcript, reply: dict, registry: ToolRegistry, secrets: Sequence[str],
             stop_on_refusal: bool) -> bool:
    """Adds one model reply (and the results of its calls) to the transcript; True when the run ends."""
    transcript.steps += 1
    content, tool_calls = reply.get("content") or "", list(reply.get("tool_calls") or [])
    if not tool_calls:
        if leaks_system_prompt(content, secrets):
            transcript.messages.append({"role": "assistant", "content": REFUSAL})
            transcript.stop_reason, transcript.answer = "refused", REFUSAL
        else:
            transcript.messages.append({"role": "assistant", "content": content})
            transcript.stop_reason, transcript.answer = "answered", content
        return True
    transcript.messages.append({"role": "assistant", "content": content or None, "tool_calls": tool_calls})
    refused = False
    for call in tool_calls:
        status, result = _run_call(call, registry)
        refused |= status == "refused"
        function = call.get("function") or {}
        transcript.tool_calls.append({"id": call.get("id", ""), "name": function.get("name", ""),
                                      "arguments": function.get("arguments", ""), "status": status, "result": result})
        transcript.messages.append({"role": "tool", "tool_call_id": call.get("id", ""), "content": result})
    if refused and stop_on_refusal:
        transcript.stop_reason = "refused"
        return True
    return False


def _secrets(messages: Sequence[dict]) -> list[str]:
    return [m.get("content") or "" for m in messages if m.get("role") == "system"]


def run_agent(chat: Chat, messages: Sequence[dict], registry: ToolRegistry, *, max_steps: int = 5,
              stop_on_refusal: bool = True) -> Transcript:
    """Runs the tool-calling loop until the model answers without calls or `max_steps` model calls.

    Args:
      chat: chat(messages, tools) -> {"content": str | None, "tool_calls": [...] | None}.
      messages: the conversation so far, OpenAI format (system prompt first, if any).
      registry: the allow-list; its tools are offered to the model and only they run.
      max_steps: the most model calls.
      stop_on_refusal: stop (stop_reason "refused") after a call outside the allow-list; else the
        refusal is the tool's result and the loop goes on.

    Returns:
      The `Transcript`.
    """
    return run_agents(lambda conversations, tools: [chat(c, tools) for c in conversations], [messages], registry,
                      max_steps=max_steps, stop_on_refusal=stop_on_refusal)[0]


def run_agents(chat_batch: Callable[[list[list[dict]], list[dict]], list[dict]],
               conversations: Sequence[Sequence[dict]], registry: ToolRegistry, *, max_steps: int = 5,
               stop_on_refusal: bool = True) -> list[Transcript]:
    """`run_agent` on many conversations in lockstep: each step asks the model about every
    conversation still running in one call (`LocalChat.batch` generates them as one batch).

    Args:
      chat_batch: chat_batch(list of conversations, tools) -> one assistant message each.
      conversations, registry, max_steps, stop_on_refusal: as `run_agent` (per conversation).

    Returns:
      One `Transcript` per conversation, each equal to what `run_agent` gives it alone.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps={max_steps}; expected >= 1")
    transcripts = [Transcript(messages=[dict(m) for m in messages]) for messages in conversations]
    secrets = [_secrets(messages) for messages in conversations]
    tools = registry.openai_tools()
    running = list(range(len(transcripts)))
    for _ in range(max_steps):
        if not running:
            break
        replies = chat_batch([transcripts[i].messages for i in running], tools)
        running = [i for i, reply in zip(running, replies, strict=True)
                   if not _advance(transcripts[i], reply, registry, secrets[i], stop_on_refusal)]
    for i in running:
        transcripts[i].stop_reason = "step_limit"
    return transcripts


class LocalChat:
    """A `chat` backed by lmlab's in-process generation (`inference.generate`); see `local_chat`."""

    def __init__(self, model, params, tokenizer, *, template: str = "chatml", max_new_tokens: int = 64,
                 temperature: float = 0.0, seed: int = 0):
        from data.sft import end_of_turn

        self.model, self.params, self.tokenizer, self.template = model, params, tokenizer, template
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.stop_text = end_of_turn(tokenizer, template)
        stop_ids = tokenizer.encode(self.stop_text) if self.stop_text else []
        self.stop_tokens = tuple(stop_ids) if len(stop_ids) == 1 else ()
        if not self.stop_tokens and tokenizer.eos_id is not None:
            self.stop_tokens = (tokenizer.eos_id,)

    def prompt_ids(self, messages: Sequence[dict], tools: Sequence[dict] | None) -> list[int]:
        """The token ids the model reads: `calls.with_tools`, rendered with the generation prompt."""
        from data import chat as chat_templates

        ids, _ = chat_templates.render(self.tokenizer, calls.with_tools(messages, tools), add_generation_prompt=True,
                                       template=self.template or None)
        return ids

    def _reply(self, tokens: Sequence[int]) -> dict:
        tokens = list(tokens)
        cut = next((i for i, t in enumerate(tokens) if t in self.stop_tokens), len(tokens))
        text = self.tokenizer.decode(tokens[:cut])
        if self.stop_text and self.stop_text in text:
            text = text[:text.index(self.stop_text)]
        content, tool_calls = calls.parse_tool_calls(text)
        return {"role": "assistant", "content": content, "tool_calls": tool_calls or None}

    def batch(self, conversations: Sequence[Sequence[dict]], tools: Sequence[dict] | None) -> list[dict]:
        """One reply per conversation, generated as one batch (greedy replies equal `__call__`'s)."""
        from inference.generate import generate

        prompts = [self.prompt_ids(messages, tools) for messages in conversations]
        room = self.model.config.max_len - max(len(p) for p in prompts)
        if room < 1:
            raise ValueError(f"a conversation has {max(len(p) for p in prompts)} tokens, which fills the model's "
                             f"context of max_len={self.model.config.max_len}")
        out = generate(self.model, self.params, prompts, max_new_tokens=min(self.max_new_tokens, room),
                       temperature=self.temperature, seed=self.seed, stop_tokens=self.stop_tokens)
        return [self._reply(tokens) for tokens in out]

    def __call__(self, messages: Sequence[dict], tools: Sequence[dict] | None) -> dict:
        return self.batch([messages], tools)[0]


def local_chat(model, params=None, tokenizer=None, *, template: str = "chatml", max_new_tokens: int = 64,
               temperature: float = 0.0, seed: int = 0) -> LocalChat:
    """A `chat` backed by lmlab's in-process generation.

    Args:
      model, params, tokenizer: a decoder-only `GPT`, its params and its tokenizer; or an
        `inference.load.Loaded` as `model` alone.
      template: the chat template ("chatml", "llama3", a Jinja string, or "" for the tokenizer's).
      max_new_tokens, temperature, seed: generation settings (temperature 0: greedy).

    Returns:
      chat(messages, tools) -> {"role": "assistant", "content", "tool_calls"}: the messages are
      rendered through `calls.with_tools`, the reply cut at the template's end of turn and parsed
      with `calls.parse_tool_calls`; `.batch(conversations, tools)` answers many at once.
    """
    if params is None and tokenizer is None:
        model, params, tokenizer = model.model, model.params, model.tokenizer
    return LocalChat(model, params, tokenizer, template=template, max_new_tokens=max_new_tokens,
                     temperature=temperature, seed=seed)


def openai_chat(client: Any, model: str, **request) -> Chat:
    """A `chat` backed by an OpenAI-compatible server (an `openai.OpenAI` client)."""
    def chat(messages: list[dict], tools: list[dict]) -> dict:
        extra = {"tools": tools} if tools else {}
        response = client.chat.completions.create(model=model, messages=messages, **extra, **request)
        return response.choices[0].message.model_dump(exclude_none=True)

    return chat
