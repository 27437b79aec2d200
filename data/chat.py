"""Chat templates: a conversation -> token ids and the mask of the assistant's tokens.

    ids, assistant_mask = render(tokenizer, [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello!"}])

The template is the tokenizer's own Jinja `chat_template` (a Hugging Face directory's, see
`data.tokenizer.load_tokenizer`), or a built-in one by name ("chatml", "llama3") for
lmlab's byte-level BPE, or any Jinja string. It is rendered the way transformers'
`apply_chat_template` renders it (a sandboxed Jinja environment with trim_blocks and
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps
non-ASCII, the tokenizer's named special tokens such as `bos_token` as variables), and the
text is encoded with special and added tokens split out, so the ids equal transformers'
for the same directory. The text a template writes inside `{% generation %} ...
{% endgeneration %}` is the assistant's; a token is an assistant token when its character
span overlaps that text (transformers' `return_assistant_tokens_mask`). The built-in
templates put each assistant turn's content and its end-of-turn token inside the tags, so
the model learns to stop.

Template markers that the vocabulary lacks as special tokens (ChatML's <|im_start|> on a
BPE trained with only <|endoftext|>) are encoded as ordinary text, as transformers would.
"""

from __future__ import annotations

import contextvars
import functools
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}
# The special tokens each built-in template writes (for training a BPE that has them).
BUILTIN_SPECIAL_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}

# The render in progress: (rendered blocks so far, generation spans found).
_TRACKING: contextvars.ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = contextvars.ContextVar(
    "lmlab_chat_tracking", default=None)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: records the character span of its output."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_record"), [], [], body).set_lineno(lineno)

    def _record(self, caller) -> str:
        text = caller()
        tracking = _TRACKING.get()
        if tracking is not None:
            blocks, spans = tracking
            start = sum(len(block) for block in blocks)
            spans.append((start, start + len(text)))
        return text


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace without underscore attributes (no reaching CPython internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set the namespace attribute {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which chat templates must not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compiles a chat template in transformers' sandboxed environment.

    Raises:
      ValueError: the template is not valid Jinja.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=lambda *args, **kwargs: dict(*args, **kwargs), namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def resolve_template(tokenizer: Any, template: str | None = None) -> str:
    """The template source: `template` (a built-in name or a Jinja string), else the tokenizer's.

    Raises:
      ValueError: no template is given and the tokenizer has none.
    """
    if template:
        return BUILTIN_TEMPLATES.get(template, template)
    own = getattr(tokenizer, "chat_template", None)
    if not own:
        raise ValueError("the tokenizer has no chat_template; pass template='chatml' or 'llama3' (built in) "
                         "or a Jinja string, or give a Hugging Face directory whose tokenizer_config.json has one")
    return own


def _check_messages(messages: Sequence[dict]) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            # ValueError, like every bad line of a data file.
            raise ValueError(f"each message must be a dict with a string 'role', got {message!r:.80}")  # noqa: TRY004
    # As transformers does: a key holding None is dropped (templates test for presence).
    return [{key: value for key, value in message.items() if value is not None} for message in messages]


def render_text(tokenizer: Any, messages: Sequence[dict], add_generation_prompt: bool = False,
                template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its `{% generation %}` blocks."""
    compiled = compile_template(resolve_template(tokenizer, template))
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    variables = {**getattr(tokenizer, "special_tokens_map", {})}
    token = _TRACKING.set((blocks, spans))
    try:
        for block in compiled.generate(messages=_check_messages(messages), tools=None, documents=None,
                                       add_generation_prompt=add_generation_prompt, **variables):
            # One block at a time: the generation tag measures what was rendered before it.
            blocks.append(block)  # noqa: PERF402
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template failed to render: {e}") from None
    finally:
        _TRACKING.reset(token)
    return "".join(blocks), spans


def overlap_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose character span overlaps one of `spans` (both in order), else 0."""
    mask, span = [0] * len(offsets), 0
    for index, (start, end) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if end > spans[span][0]:
            mask[index] = 1
    return mask


def render(tokenizer: Any, messages: Sequence[dict], add_generation_prompt: bool = False,
           template: str | None = None) -> tuple[list[int], list[int]]:
    """Renders a conversation with a chat template and encodes it.

    Args:
      tokenizer: a `data.tokenizer.Tokenizer` (its `chat_template`, `special_tokens_map` and
        `encode_with_offsets` are used).
      messages: [{'role': 'system' | 'user' | 'assistant' | ..., 'content': str}, ...].
      add_generation_prompt: end with the header of an assistant turn (for generation).
      template: None: the tokenizer's own; 'chatml' or 'llama3': built in; else a Jinja string.

    Returns:
      (ids, assistant_mask): the token ids (transformers' `apply_chat_template(messages,
      tokenize=True)` for a Hugging Face directory) and 1 exactly on the tokens the template
      writes inside `{% generation %}` blocks.

    Raises:
      ValueError: bad messages, no template, or a template that fails to render.
    """
    text, spans = render_text(tokenizer, messages, add_generation_prompt, template)
    ids, offsets = tokenizer.encode_with_offsets(text)
    return list(ids), overlap_mask(offsets, spans)


def check_template_key(template: str) -> None:
    """`sft.chat_template` (a builtin name or a Jinja string; "" passes) compiles.

    Raises:
      ValueError: one line naming the key and the fix.
    """
    if not template:
        return
    try:
        compile_template(BUILTIN_TEMPLATES.get(template, template))
    except ValueError as e:
        raise ValueError(f"config key `sft.chat_template`: {e}; give chatml, llama3 or a valid Jinja "
                         "template") from None
