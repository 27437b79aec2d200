"""Tools an agent may call, and the allow-list that decides which.

    registry = ToolRegistry([calculator(), retrieval_search(index)])
    registry.load("mypkg.weather:forecast_tool")     # a user tool, by import path
    registry.openai_tools()                           # OpenAI `tools` for the prompt
    registry.call("calculator", {"expression": "4821 * 37"})   # -> "178377"

Only registered tools run: a call to any other name raises `ToolRefused` and nothing executes.
A user tool is loaded by naming it (`pkg.mod:attr`); the attribute must already be a `Tool` (or a
factory marked with `@tool_factory`), so an import path can never turn an arbitrary function (a
shell, `os.system`, `eval`) into a tool. The calculator walks Python's `ast` of the expression and
evaluates only numbers and arithmetic operators; nothing here calls `eval` or `exec`, and there is
no shell tool.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict,
               "array": list}


class ToolError(ValueError):
    """A tool call that could not run (bad arguments, or the tool failed); its text goes back to the model."""


class ToolRefused(ToolError):
    """A call to a tool outside the allow-list; nothing was executed."""


@dataclasses.dataclass(frozen=True)
class Tool:
    """A function an agent can call.

    Attributes:
      name: what the model writes in its call ([A-Za-z0-9_-], as OpenAI requires).
      description: what it does, for the model.
      parameters: the JSON schema of its arguments (an object schema).
      fn: fn(**arguments) -> str, the result the model reads.
    """

    name: str
    description: str
    parameters: dict
    fn: Callable[..., str]

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.name or ""):
            raise ValueError(f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-'")
        if not isinstance(self.parameters, dict) or self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON object schema "
                             f"({{'type': 'object', 'properties': {{...}}}}), got {self.parameters!r:.80}")

    def openai(self) -> dict:
        """This tool as one entry of OpenAI's `tools`."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def tool_factory(fn: Callable[[], Tool]) -> Callable[[], Tool]:
    """Marks a zero-argument function returning a `Tool` as loadable by import path."""
    fn.lmlab_tool_factory = True
    return fn


def check_arguments(tool: Tool, arguments: Any) -> dict:
    """`arguments` checked against the tool's schema (required keys, no unknown keys, simple types).

    Raises:
      ToolError: one line naming the problem.
    """
    if not isinstance(arguments, dict):
        raise ToolError(f"{tool.name}: arguments must be a JSON object, got {type(arguments).__name__}")
    properties = tool.parameters.get("properties", {})
    missing = [key for key in tool.parameters.get("required", ()) if key not in arguments]
    unknown = [key for key in arguments if key not in properties]
    if missing or unknown:
        raise ToolError(f"{tool.name}: missing arguments {missing}, unknown arguments {unknown}; it takes "
                        f"{sorted(properties)}")
    for key, value in arguments.items():
        kind = _JSON_TYPES.get(properties[key].get("type"))
        if kind is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
            raise ToolError(f"{tool.name}: argument {key!r} must be {properties[key]['type']}, got {value!r:.40}")
    return arguments


class ToolRegistry:
    """The allow-list: the tools an agent may call, by name.

    Args:
      tools: the tools to register.
      allow: if given, only these names are offered and run (a tool registered under another
        name stays unreachable); else every registered tool.
    """

    def __init__(self, tools: Iterable[Tool] = (), *, allow: Iterable[str] | None = None):
        self._tools: dict[str, Tool] = {}
        self._allow = None if allow is None else set(allow)
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> Tool:
        """Allows `tool` (a second tool of the same name is an error)."""
        if not isinstance(tool, Tool):
            raise TypeError(f"only agents.tools.Tool instances can be registered, got {type(tool).__name__}")
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool
        return tool

    def load(self, spec: str) -> Tool:
        """Registers the tool at import path `pkg.mod:attr` (a `Tool`, or a `@tool_factory` function).

        Raises:
          ValueError: a malformed path, a missing module or attribute, or an attribute that is not a tool.
        """
        if not isinstance(spec, str) or not _IMPORT_PATH.match(spec):
            raise ValueError(f"tool {spec!r}: expected an import path pkg.module:attribute naming a Tool")
        module_name, attr = spec.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"tool {spec!r}: cannot import {module_name} ({e})") from None
        if not hasattr(module, attr):
            raise ValueError(f"tool {spec!r}: module {module_name} has no attribute {attr!r}")
        found = getattr(module, attr)
        if getattr(found, "lmlab_tool_factory", False):
            found = found()
        if not isinstance(found, Tool):
            raise ValueError(f"tool {spec!r} is a {type(found).__name__}, not an agents.tools.Tool; define "  # noqa: TRY004
                             "Tool(name, description, parameters, fn) (or a @tool_factory) and name that")
        return self.register(found)

    @property
    def names(self) -> list[str]:
        """The allowed tools' names, in registration order."""
        return [name for name in self._tools if self.allowed(name)]

    def allowed(self, name: str) -> bool:
        return name in self._tools and (self._allow is None or name in self._allow)

    def openai_tools(self) -> list[dict]:
        """The allowed tools as OpenAI's `tools` list."""
        return [self._tools[name].openai() for name in self.names]

    def call(self, name: str, arguments: Mapping[str, Any]) -> str:
        """Runs an allowed tool.

        Raises:
          ToolRefused: `name` is not on the allow-list (nothing runs).
          ToolError: bad arguments, or the tool raised (its message, one line).
        """
        if not self.allowed(name):
            raise ToolRefused(f"tool {name!r} is not allowed; the allowed tools are {self.names}")
        tool = self._tools[name]
        arguments = check_arguments(tool, arguments)
        try:
            result = tool.fn(**arguments)
        except ToolError:
            raise
        except Exception as e:  # noqa: BLE001 -- a tool's failure is the model's to read, not the loop's to crash on
            raise ToolError(f"{name} failed: {type(e).__name__}: {e}") from None
        return result if isinstance(result, str) else str(result)


# ---------------------------------------------------------------- calculator
MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 1000
MAX_DIGITS = 1000
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _check_size(x: float) -> int | float:
    if isinstance(x, int) and x.bit_length() > MAX_DIGITS * 3.33:
        raise ToolError(f"calculator: result has more than {MAX_DIGITS} digits")
    if isinstance(x, float) and not math.isfinite(x):
        raise ToolError("calculator: result is not finite")
    return x


def _power(base: float, exponent: float) -> int | float:
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(f"calculator: exponent {exponent} is larger than {MAX_EXPONENT}")
    big = isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and base not in (0, 1, -1)
    if big and math.log10(abs(base)) * exponent > MAX_DIGITS:
        raise ToolError(f"calculator: result has more than {MAX_DIGITS} digits")
    result = base ** exponent
    if isinstance(result, complex):
        raise ToolError("calculator: a negative number to a fractional power is not a real number")
    return result


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _check_size(_power(left, right))
        try:
            return _check_size(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ToolError("calculator: division by zero") from None
        except OverflowError:
            raise ToolError("calculator: result is too large") from None
    raise ToolError(f"calculator: {type(node).__name__} is not allowed; use numbers, + - * / // % ** and "
                    "parentheses")


def evaluate_arithmetic(expression: str) -> int | float:
    """The value of an arithmetic expression, from its syntax tree (never `eval`).

    Raises:
      ToolError: too long, not arithmetic (names, calls, attributes, ...), division by zero, or a
        result too large.
    """
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"calculator: the expression must be a string of at most {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"calculator: {expression!r:.60} is not an arithmetic expression") from None
    try:
        return _evaluate(tree)
    except OverflowError:
        raise ToolError("calculator: result is too large") from None


def format_number(x: float) -> str:
    """Integers as digits; a float with an integral value below 2**53 without its '.0'."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 2**53:
        return str(int(x))
    return repr(x) if isinstance(x, float) else str(x)


@tool_factory
def calculator() -> Tool:
    """The arithmetic calculator tool (`evaluate_arithmetic`)."""
    return Tool(
        name="calculator",
        description="Evaluates an arithmetic expression with + - * / // % ** and parentheses.",
        parameters={"type": "object", "properties": {"expression": {
            "type": "string", "description": "The arithmetic expression, e.g. 4821 * 37"}},
            "required": ["expression"]},
        fn=lambda expression: format_number(evaluate_arithmetic(expression)))


def retrieval_search(index, k: int = 3, *, name: str = "retrieval_search") -> Tool:
    """A tool that searches a `rag.index.Index` and returns its top `k` chunks, numbered.

    Args:
      index: anything with `search(queries, k) -> list[list[Hit]]` (a `rag.index.Index`).
      k: chunks returned per query.
      name: the tool's name.
    """
    def search(query: str) -> str:
        hits = index.search([query], k)[0]
        if not hits:
            return "no documents found"
        return "\n".join(f"[{i}] ({hit.chunk.source}) {hit.chunk.text}" for i, hit in enumerate(hits, start=1))

    return Tool(name=name, description=f"Searches the document index and returns the {k} most relevant passages.",
                parameters={"type": "object", "properties": {"query": {
                    "type": "string", "description": "What to search for"}}, "required": ["query"]},
                fn=search)
