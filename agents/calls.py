"""The text format tool calls are written in (Hermes / Qwen2.5 style), both directions.

    prompt_messages = with_tools(openai_messages, openai_tools)   # plain {role, content} turns
    content, tool_calls = parse_tool_calls(generated_text)        # OpenAI `tool_calls`

A model calls a tool by writing

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "3*4"}}
    </tool_call>

and reads the result as a user turn holding `<tool_response>\n...\n</tool_response>`. The plain
messages `with_tools` returns, rendered by ChatML (`data.chat.CHATML`), give exactly the text
Qwen2.5's own template renders from the OpenAI-format conversation with `tools=` (a test checks
this against transformers' `apply_chat_template`), so any chat template in `data/chat.py` can carry
tool calls without knowing about them.

Tool results are data, not instructions: the markers a tool's output could use to fake the end of
its response or a new call are neutralized before the output enters the prompt.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence

DEFAULT_SYSTEM = "You are a helpful assistant."
_TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                 "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                 "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                 '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
# Markers a tool output must not be able to write (it would end its own response or forge a call).
_MARKERS = ("<tool_response>", "</tool_response>", "<tool_call>", "</tool_call>", "<|im_start|>", "<|im_end|>")


def _dumps(x) -> str:
    # transformers' template `tojson`: no ASCII escaping, default separators.
    return json.dumps(x, ensure_ascii=False)


def _check_tools(tools: Sequence[dict]) -> list[dict]:
    checked = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"each tool must be {{'type': 'function', 'function': {{'name': str, 'description': "
                             f"str, 'parameters': {{...}}}}}} (OpenAI's shape), got {tool!r:.100}")
        checked.append(tool)
    return checked


def tools_system_prompt(tools: Sequence[dict]) -> str:
    """The instructions that describe `tools` and the call format (Qwen2.5's wording).

    Args:
      tools: OpenAI `tools`: [{"type": "function", "function": {"name", "description", "parameters"}}].

    Returns:
      The text appended (after a blank line) to the system prompt.

    Raises:
      ValueError: a tool is not in OpenAI's shape.
    """
    return _TOOLS_HEADER + "".join("\n" + _dumps(tool) for tool in _check_tools(tools)) + _TOOLS_FOOTER


def format_tool_call(name: str, arguments: dict | str) -> str:
    """One call as the model writes it (`arguments` a dict or OpenAI's JSON string)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # kept verbatim: the conversation shows what was asked
    arguments = arguments if isinstance(arguments, str) else _dumps(arguments)
    return '<tool_call>\n{"name": "' + name + '", "arguments": ' + arguments + "}\n</tool_call>"


def escape_tool_output(text: str) -> str:
    """A tool's output with the call/response/turn markers broken up, so it stays data."""
    for marker in _MARKERS:
        text = text.replace(marker, marker[0] + "\u200b" + marker[1:])
    return text


def _assistant_text(message: dict) -> str:
    parts = [message["content"]] if message.get("content") else []
    for call in message.get("tool_calls") or ():
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            # ValueError: bad request input, answered as a 400 by the server.
            raise ValueError(f"an assistant tool call must be {{'id', 'type': 'function', 'function': {{'name', "  # noqa: TRY004
                             f"'arguments'}}}}, got {call!r:.100}")
        parts.append(format_tool_call(function["name"], function.get("arguments", {})))
    return "\n".join(parts)


def _content_text(content) -> str:
    # OpenAI also allows content as a list of parts; text parts are joined.
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    raise ValueError(f"message content must be a string or a list of text parts, got {content!r:.80}")


def with_tools(messages: Sequence[dict], tools: Sequence[dict] | None, *,
               default_system: str = DEFAULT_SYSTEM) -> list[dict]:
    """OpenAI-format messages -> plain {role, content} messages any chat template renders.

    Args:
      messages: OpenAI chat messages; assistant turns may carry `tool_calls`, tool results are
        {"role": "tool", "tool_call_id", "content"}.
      tools: OpenAI `tools`, or None/[] (then no tools prompt is added).
      default_system: the system text used with tools when the conversation has none.

    Returns:
      Messages whose assistant turns hold the calls as `<tool_call>` text and whose consecutive
      tool results form one user turn of `<tool_response>` blocks (outputs escaped as data); with
      tools, the first message is a system turn ending in `tools_system_prompt(tools)`.

    Raises:
      ValueError: a malformed message, tool call or tool.
    """
    plain: list[dict] = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"each message must be a dict with a string 'role', got {message!r:.80}")  # noqa: TRY004
        role = message["role"]
        if role == "assistant":
            plain.append({"role": "assistant", "content": _assistant_text(message)})
        elif role == "tool":
            block = "<tool_response>\n" + escape_tool_output(_content_text(message.get("content"))) + "\n</tool_response>"
            if plain and plain[-1].get("_tool"):
                plain[-1]["content"] += "\n" + block
            else:
                plain.append({"role": "user", "content": block, "_tool": True})
        else:
            plain.append({"role": role, "content": _content_text(message.get("content"))})
    plain = [{"role": m["role"], "content": m["content"]} for m in plain]
    if tools:
        prompt = tools_system_prompt(tools)
        if plain and plain[0]["role"] == "system":
            plain[0] = {"role": "system", "content": plain[0]["content"] + "\n\n" + prompt}
        else:
            plain.insert(0, {"role": "system", "content": default_system + "\n\n" + prompt})
    return plain


def _parse_call(body: str) -> dict | None:
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models write OpenAI's string form
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": call["name"], "arguments": _dumps(arguments)}}


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Generated text -> (the content without its tool calls, OpenAI `tool_calls`).

    Args:
      text: what the model wrote.

    Returns:
      (content, tool_calls): each well-formed `<tool_call>{"name", "arguments"}</tool_call>` becomes
      {"id": "call_...", "type": "function", "function": {"name", "arguments": JSON string}} and is
      cut from the content; a block that is not valid JSON, lacks a name or has non-object
      arguments (or is never closed) stays in the content. The content is stripped.
    """
    calls: list[dict] = []
    pieces: list[str] = []
    end = 0
    for match in _CALL_RE.finditer(text):
        call = _parse_call(match.group(1).strip())
        if call is None:
            continue
        pieces.append(text[end:match.start()])
        end = match.end()
        calls.append(call)
    pieces.append(text[end:])
    return "".join(pieces).strip(), calls
