"""The server's optional parts, each from its own package: embeddings and retrieval (`rag`),
tool calls (`agents.calls`), moderation (`safety.moderation`).

    hooks = Hooks.load(embedding_model=DIR, rag_index=DIR, rag_k=3, moderation=SPEC)

Loading checks what it is given before the server starts (one-line errors); the blocking
model calls (embedding, search, moderation) run on a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import os
from typing import Any


def _module(name: str, what: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"{what} needs the `{name}` module, which cannot be imported ({e})") from None


@dataclasses.dataclass
class Hooks:
    embedder: Any = None
    rag_index: Any = None
    rag_k: int = 3
    moderator: Any = None
    tools: list[dict] | None = None  # offered to chat requests that bring no `tools` of their own

    @classmethod
    def load(cls, *, embedding_model: str | None = None, rag_index: str | None = None, rag_k: int = 3,
             moderation: str | None = None, tools: str | None = None) -> Hooks:
        """Loads what the flags name.

        Args:
          embedding_model: a sentence-transformers / Hugging Face BERT directory (`rag.embed.Embedder`).
          rag_index: a directory saved by `rag.index.Index.save` (its embedder from the index
            unless `embedding_model` is given).
          rag_k: passages retrieved per chat request.
          moderation: `safety.moderation.load_moderator`'s spec.
          tools: "pkg.mod:attr,..." user tools (`agents.tools.ToolRegistry.load`) whose OpenAI
            schemas chat requests get by default; the client runs them (OpenAI's tool protocol).
        """
        hooks = cls(rag_k=rag_k)
        if rag_k < 1:
            raise ValueError(f"--rag_k={rag_k} must be >= 1")
        for flag, path in (("--embedding_model", embedding_model), ("--rag_index", rag_index)):
            if path is not None and not os.path.isdir(path):
                raise ValueError(f"{flag}={path!r} is not a directory")
        if embedding_model:
            hooks.embedder = _module("rag.embed", "--embedding_model").Embedder.load(embedding_model)
        if rag_index:
            index_lib = _module("rag.index", "--rag_index")
            hooks.rag_index = index_lib.Index.load(rag_index, embedder=hooks.embedder)
            _module("rag.generate", "--rag_index")
        if tools:
            registry = _module("agents.tools", "--tools").ToolRegistry()
            for spec in (s.strip() for s in tools.split(",") if s.strip()):
                registry.load(spec)
            hooks.tools = registry.openai_tools()
        if moderation:
            hooks.moderator = _module("safety.moderation", "--moderation").load_moderator(moderation)
        return hooks

    @property
    def embedding_name(self) -> str | None:
        if self.embedder is None:
            return None
        return getattr(self.embedder, "name", None) or "embedding"

    async def embed(self, texts: list[str]):
        return await asyncio.to_thread(self.embedder.encode, texts)

    async def flagged(self, texts: list[str]) -> bool:
        results = await self.moderate(texts)
        return any(r.flagged for r in results)

    async def moderate(self, texts: list[str]):
        return await asyncio.to_thread(self.moderator.check, texts)

    def refusal(self) -> str:
        return importlib.import_module("safety.moderation").REFUSAL

    async def retrieve(self, messages: list[dict]) -> tuple[list[dict], list[dict]]:
        """Messages whose last user turn carries retrieved sources, and the citations."""
        generate = importlib.import_module("rag.generate")
        last = max(i for i, m in enumerate(messages) if m["role"] == "user") if any(
            m["role"] == "user" for m in messages) else None
        if last is None or not messages[last]["content"].strip():
            return messages, []
        question = messages[last]["content"]
        hits = (await asyncio.to_thread(self.rag_index.search, [question], self.rag_k))[0]
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
        rag = generate.rag_messages(question, hits, system=system)
        history = [m for m in messages[:last] if m["role"] != "system"]
        out = [m for m in rag if m["role"] == "system"] + history + [m for m in rag if m["role"] != "system"]
        return out + messages[last + 1:], generate.citations(hits)

    @staticmethod
    def with_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
        from inference.serve.protocol import APIError

        try:
            return _module("agents.calls", "a request with `tools`").with_tools(messages, tools)
        except ValueError as e:
            raise APIError(400, f"tools or tool messages: {e}", param="tools") from None

    @staticmethod
    def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
        return _module("agents.calls", "a request with `tools`").parse_tool_calls(text)
