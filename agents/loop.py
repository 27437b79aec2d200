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
    if max_steps < 1:
        raise ValueError(f"max_steps={max_steps}; expected >= 1")
    transcript = Transcript(messages=[dict(m) for m in messages])
    secrets = [m.get("content") or "" for m in messages if m.get("role") == "system"]
    tools = registry.openai_tools()
    for _ in range(max_steps):
        reply = chat(transcript.messages, tools)
        transcript.steps += 1
        content, tool_calls = reply.get("content") or "", list(reply.get("tool_calls") or [])
        if not tool_calls:
            if leaks_system_prompt(content, secrets):
                transcript.messages.append({"role": "assistant", "content": REFUSAL})
                transcript.stop_reason, transcript.answer = "refused", REFUSAL
            else:
                transcript.messages.append({"role": "assistant", "content": content})
                transcript.stop_reason, transcript.answer = "answered", content
            return transcript
        transcript.messages.append({"role": "assistant", "content": content or None, "tool_calls": tool_calls})
        refused = False
        for call in tool_calls:
            status, result = _run_call(call, registry)
            refused |= status == "refused"
            function = call.get("function") or {}
            transcript.tool_calls.append({"id": call.get("id", ""), "name": function.get("name", ""),
                                          "arguments": function.get("arguments", ""), "status": status,
                                          "result": result})
            transcript.messages.append({"role": "tool", "tool_call_id": call.get("id", ""), "content": result})
        if refused and stop_on_refusal:
            transcript.stop_reason = "refused"
            return transcript
    transcript.stop_reason = "step_limit"
    return transcript


def local_chat(model, params=None, tokenizer=None, *, template: str = "chatml", max_new_tokens: int = 64,
               temperature: float = 0.0, seed: int = 0) -> Chat:
    """A `chat` backed by lmlab's in-process generation (`inference.generate`).

    Args:
      model, params, tokenizer: a decoder-only `GPT`, its params and its tokenizer; or an
        `inference.load.Loaded` as `model` alone.
      template: the chat template ("chatml", "llama3", a Jinja string, or "" for the tokenizer's).
      max_new_tokens, temperature, seed: generation settings (temperature 0: greedy).

    Returns:
      chat(messages, tools) -> {"role": "assistant", "content", "tool_calls"}: the messages are
      rendered through `calls.with_tools`, the reply cut at the template's end of turn and parsed
      with `calls.parse_tool_calls`.
    """
    from data import chat as chat_templates
    from data.sft import end_of_turn
    from inference.generate import generate

    if params is None and tokenizer is None:
        model, params, tokenizer = model.model, model.params, model.tokenizer
    stop_text = end_of_turn(tokenizer, template)
    stop_ids = tokenizer.encode(stop_text) if stop_text else []
    stop_tokens = tuple(stop_ids) if len(stop_ids) == 1 else ()
    if not stop_tokens and tokenizer.eos_id is not None:
        stop_tokens = (tokenizer.eos_id,)

    def chat(messages: list[dict], tools: list[dict]) -> dict:
        plain = calls.with_tools(messages, tools)
        ids, _ = chat_templates.render(tokenizer, plain, add_generation_prompt=True, template=template or None)
        room = model.config.max_len - len(ids)
        if room < 1:
            raise ValueError(f"the conversation has {len(ids)} tokens, which fills the model's context of "
                             f"max_len={model.config.max_len}")
        out = generate(model, params, [ids], max_new_tokens=min(max_new_tokens, room), temperature=temperature,
                       seed=seed, stop_tokens=stop_tokens)[0]
        text = tokenizer.decode([t for t in out if t not in stop_tokens])
        if stop_text and stop_text in text:
            text = text[:text.index(stop_text)]
        content, tool_calls = calls.parse_tool_calls(text)
        return {"role": "assistant", "content": content, "tool_calls": tool_calls or None}

    return chat


def openai_chat(client: Any, model: str, **request) -> Chat:
    """A `chat` backed by an OpenAI-compatible server (an `openai.OpenAI` client)."""
    def chat(messages: list[dict], tools: list[dict]) -> dict:
        extra = {"tools": tools} if tools else {}
        response = client.chat.completions.create(model=model, messages=messages, **extra, **request)
        return response.choices[0].message.model_dump(exclude_none=True)

    return chat
