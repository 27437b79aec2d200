"""A chat data set that ships with lmlab: questions about Python answered from the text of
CPython's own documentation (`pydoc_data.topics`), so that fine-tuning runs need no network.

Each topic of `pydoc_data.topics` (the reference-manual pages `help()` shows) gives
  * a conversation asking about the topic, answered with its first paragraph of prose, and,
    where the topic holds code or grammar, a second turn asking for it, answered with the
    first indented block;
  * one conversation per section of the topic, answered with the section's first paragraph;
some with a system message. The questions' wording rotates through fixed phrasings, so the
same CPython version gives the same conversations, in the same order (`conversations()`).
"""

from __future__ import annotations

import json
import os
import pydoc_data.topics
import textwrap

SYSTEM = "You are a concise assistant that answers questions about the Python language."
TOPIC_QUESTIONS = (
    "What is {title} in Python?",
    "Can you explain {title}?",
    "Tell me about {title} in Python.",
    "How does Python describe {title}?",
)
SECTION_QUESTIONS = (
    "In the Python reference, what does the section \"{section}\" of \"{title}\" say?",
    "Explain \"{section}\" ({title}).",
    "What should I know about \"{section}\" when reading about {title}?",
)
CODE_QUESTION = "Can you show the syntax or an example?"
_UNDERLINES = set("=-*~^")


def _blocks(text: str) -> list[str]:
    return [block for block in text.split("\n\n") if block.strip()]


def _is_code(block: str) -> bool:
    return block.startswith("   ")


def _prose(block: str) -> str:
    return " ".join(line.strip() for line in block.splitlines() if line.strip())


def _sections(body: str) -> list[tuple[str, str]]:
    """(heading, text) of each section: a line underlined by a run of = - * ~ or ^."""
    lines, found, heading, start = body.splitlines(), [], None, 0
    for i in range(1, len(lines)):
        underline = lines[i].strip()
        if underline and set(underline) <= _UNDERLINES and len(underline) >= len(lines[i - 1].strip()) > 0:
            if heading is not None:
                found.append((heading, "\n".join(lines[start:i - 1])))
            heading, start = lines[i - 1].strip(), i + 1
    if heading is not None:
        found.append((heading, "\n".join(lines[start:])))
    return found


def conversations() -> list[dict]:
    """The conversations, as `{"messages": [...]}` records (see the module docstring)."""
    records = []
    for index, key in enumerate(sorted(pydoc_data.topics.topics)):
        sections = _sections(pydoc_data.topics.topics[key])
        if not sections:
            continue
        title, body = sections[0][0], pydoc_data.topics.topics[key]
        title = "the" + title[3:] if title.startswith("The ") else title
        blocks = _blocks(sections[0][1])
        prose = [_prose(b) for b in blocks if not _is_code(b)]
        if prose:
            messages = [{"role": "system", "content": SYSTEM}] if index % 3 == 0 else []
            messages += [{"role": "user", "content": TOPIC_QUESTIONS[index % len(TOPIC_QUESTIONS)].format(title=title)},
                         {"role": "assistant", "content": prose[0]}]
            code = [b for b in _blocks(body) if _is_code(b)]
            if code:
                messages += [{"role": "user", "content": CODE_QUESTION},
                             {"role": "assistant", "content": textwrap.dedent(code[0]).strip("\n")}]
            records.append({"messages": messages})
        for number, (section, text) in enumerate(sections[1:]):
            paragraphs = [_prose(b) for b in _blocks(text) if not _is_code(b)]
            if paragraphs:
                question = SECTION_QUESTIONS[(index + number) % len(SECTION_QUESTIONS)]
                records.append({"messages": [{"role": "user", "content": question.format(section=section,
                                                                                         title=title)},
                                             {"role": "assistant", "content": paragraphs[0]}]})
    return records


def write_jsonl(path: str | os.PathLike) -> str:
    """Writes `conversations()` as JSONL at `path` (atomically: a reader never sees half a
    file, and several processes may write the same bytes at once). Returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in conversations())
    os.replace(temporary, path)
    return path
