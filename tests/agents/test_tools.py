"""agents.tools: the ast calculator agrees with Python's arithmetic on the expressions it accepts and
refuses everything else; the registry runs only allow-listed tools, loaded only by naming them."""

import ast
import operator
import random
import sys
import types

import pytest

from agents import tools as tools_module
from agents.tools import Tool, ToolError, ToolRefused, ToolRegistry, calculator, evaluate_arithmetic

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod}
_SYMBOLS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//", ast.Mod: "%"}


def _random_expression(rng, depth):
    """(text, value) of a random integer expression, its value computed by operator (no eval)."""
    if depth == 0 or rng.random() < 0.3:
        n = rng.randint(0, 10_000)
        return str(n), n
    if rng.random() < 0.15:
        text, value = _random_expression(rng, depth - 1)
        return f"-({text})", -value
    op = rng.choice(list(_OPS))
    (lt, lv), (rt, rv) = _random_expression(rng, depth - 1), _random_expression(rng, depth - 1)
    if op in (ast.FloorDiv, ast.Mod) and rv == 0:
        rt, rv = "7", 7
    return f"({lt}) {_SYMBOLS[op]} ({rt})", _OPS[op](lv, rv)


def test_calculator_matches_python_arithmetic_on_random_expressions():
    rng = random.Random(0)
    for _ in range(300):
        text, value = _random_expression(rng, 4)
        assert evaluate_arithmetic(text) == value, text
    assert evaluate_arithmetic("2 ** 10 + -3 * +4") == 1012
    assert evaluate_arithmetic("7 / 2") == 3.5
    assert evaluate_arithmetic("2 ** -2") == 0.25
    assert evaluate_arithmetic(" (1.5 + 2.5) * 3 ") == 12.0
    tool = calculator()
    assert tool.fn(expression="4821 * 37") == str(4821 * 37)
    assert tool.fn(expression="6 / 3") == "2" and tool.fn(expression="1 / 4") == "0.25"


@pytest.mark.parametrize("expression", [
    "__import__('os').system('echo hi')", "x + 1", "abs(-3)", "(1).real", "[1, 2]", "1 if 1 else 2", "1 < 2",
    "'a' * 3", "True + 1", "1j * 2", "lambda: 1", "(x := 3)", "1; 2", "2 & 3", "not 1", "",
])
def test_calculator_refuses_anything_but_arithmetic(expression):
    with pytest.raises(ToolError, match="calculator"):
        evaluate_arithmetic(expression)


@pytest.mark.parametrize("expression", ["9 ** 9 ** 9", "10 ** 1001", "2 ** 5000", "1 / 0", "5 // 0", "3 % 0",
                                        "1e308 * 10", "10.0 ** 400", "(-8) ** 0.5", "1" * 201,
                                        "(" * 150 + "1" + ")" * 150, "9" * 300 + " * 2"])
def test_calculator_refuses_huge_or_undefined_results(expression):
    with pytest.raises(ToolError, match="calculator"):
        evaluate_arithmetic(expression)


def test_no_eval_or_exec_in_the_agents_package():
    """The package never calls eval/exec/compile nor a shell (checked on its syntax trees)."""
    import pathlib

    import agents
    builtins = {"eval", "exec", "compile", "__import__", "breakpoint"}  # called by name
    shell = {"system", "popen", "Popen", "check_output", "check_call", "spawnv", "execv", "execvp"}
    for path in pathlib.Path(agents.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = {a.name for a in node.names} | {getattr(node, "module", None) or ""}
                assert not {"subprocess", "os", "pty", "shutil"} & names, (path, names)
            if isinstance(node, ast.Call):
                fn = node.func
                assert not (isinstance(fn, ast.Name) and fn.id in builtins), (path, ast.unparse(node))
                assert not (isinstance(fn, ast.Attribute) and fn.attr in shell), (path, ast.unparse(node))


def test_registry_runs_only_allowed_tools_and_checks_arguments():
    ran = []
    echo = Tool("echo", "Echoes.", {"type": "object", "properties": {"text": {"type": "string"}},
                                    "required": ["text"]}, lambda text: ran.append(text) or text)
    registry = ToolRegistry([calculator(), echo])
    assert registry.names == ["calculator", "echo"]
    assert [t["function"]["name"] for t in registry.openai_tools()] == ["calculator", "echo"]
    assert registry.call("echo", {"text": "hi"}) == "hi" and ran == ["hi"]
    with pytest.raises(ToolRefused, match="not allowed"):
        registry.call("shell", {"command": "rm -rf /"})
    for bad in [{}, {"text": "a", "extra": 1}, {"text": 3}, ["hi"]]:
        with pytest.raises(ToolError, match="echo"):
            registry.call("echo", bad)
    assert ran == ["hi"]
    narrowed = ToolRegistry([calculator(), echo], allow=["calculator"])
    assert narrowed.names == ["calculator"] and len(narrowed.openai_tools()) == 1
    with pytest.raises(ToolRefused, match="not allowed"):
        narrowed.call("echo", {"text": "x"})
    assert ran == ["hi"]
    with pytest.raises(ValueError, match="already registered"):
        registry.register(calculator())
    failing = Tool("boom", "Fails.", {"type": "object", "properties": {}}, lambda: 1 / 0)
    registry.register(failing)
    with pytest.raises(ToolError, match="boom failed: ZeroDivisionError"):
        registry.call("boom", {})


def test_user_tools_load_by_import_path_only_when_they_are_tools(monkeypatch):
    module = types.ModuleType("lmlab_test_user_tools")
    module.weather = Tool("weather", "Weather.", {"type": "object", "properties": {"city": {"type": "string"}}},
                          lambda city="": f"sunny in {city}")
    module.calc = tools_module.calculator  # a @tool_factory
    module.plain_function = lambda city: city
    monkeypatch.setitem(sys.modules, module.__name__, module)
    registry = ToolRegistry()
    registry.load("lmlab_test_user_tools:weather")
    registry.load("lmlab_test_user_tools:calc")
    assert registry.names == ["weather", "calculator"]
    assert registry.call("weather", {"city": "Oslo"}) == "sunny in Oslo"
    for spec, message in [("os:system", "not an agents.tools.Tool"), ("builtins:eval", "not an agents.tools.Tool"),
                          ("lmlab_test_user_tools:plain_function", "not an agents.tools.Tool"),
                          ("lmlab_test_user_tools:missing", "no attribute"), ("no_such_module_xyz:tool", "cannot import"),
                          ("os.system", "import path"), ("os:system; rm", "import path")]:
        with pytest.raises(ValueError, match=message):
            registry.load(spec)
    assert registry.names == ["weather", "calculator"]
    assert not registry.allowed("system") and not registry.allowed("plain_function")
