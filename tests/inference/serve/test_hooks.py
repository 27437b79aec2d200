"""The server's hooks into the other packages: /v1/embeddings (rag.embed on the MiniLM weights),
retrieval with citations (rag.index, rag.generate), tool calls (agents.calls) and moderation of
input and output (safety.moderation's interface and refusal)."""

import asyncio
import json

import httpx
import numpy as np
import openai
import pytest

from agents.calls import format_tool_call, with_tools
from data import chat as chat_lib
from inference.serve.app import create_app
from inference.serve.generation import Choice
from inference.serve.hooks import Hooks
from inference.serve.protocol import ChatRequest
from inference.serve.testing import running_server
from rag.chunk import Document, chunk_documents
from rag.embed import Embedder
from rag.generate import citations, rag_messages
from rag.index import Index
from safety.moderation import REFUSAL, ModerationResult
from tests.minilm import minilm_path

DOCS = [Document("cache", "The KV cache stores the keys and values of every past token.", "notes"),
        Document("slots", "A free slot takes the next waiting request; the others keep decoding.", "notes"),
        Document("queue", "When the queue is full the server answers 429 with Retry-After.", "notes")]
TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "Evaluates arithmetic.",
                                           "parameters": {"type": "object", "properties": {
                                               "expression": {"type": "string"}}, "required": ["expression"]}}}]


class BlockList:
    """A moderator (safety.moderation.Moderator's interface) flagging texts that contain a listed string."""

    def __init__(self):
        self.blocked = {"forbidden"}

    def check(self, texts):
        flags = [any(b in t for b in self.blocked) for t in texts]
        return [ModerationResult(f, {"blocked": f}, {"blocked": float(f)}) for f in flags]


@pytest.fixture(scope="module")
def hooked(tiny_loaded):
    embedder = Embedder.load(minilm_path())
    index = Index.build(embedder, chunk_documents(DOCS, embedder.tokenizer, window=32, stride=24), kind="exact")
    hooks = Hooks(embedder=embedder, rag_index=index, rag_k=2, moderator=BlockList())
    app = create_app(tiny_loaded, model_name="tiny", num_slots=2, max_len=1024, chat_template="chatml", hooks=hooks)
    with running_server(app) as url:
        yield url, app, hooks


def test_embeddings_equal_the_embedder(hooked):
    url, _, hooks = hooked
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    texts = ["What does the cache store?", "A queue that is full"]
    out = client.embeddings.create(model=hooks.embedding_name, input=texts)
    np.testing.assert_array_equal(np.array([d.embedding for d in out.data], np.float32), hooks.embedder.encode(texts))
    assert out.usage.prompt_tokens == sum(len(hooks.embedder.tokenizer.encode(t)) for t in texts)
    assert hooks.embedding_name in [m.id for m in client.models.list().data]
    as_floats = httpx.post(url + "/v1/embeddings", json={"model": hooks.embedding_name, "input": texts[0],
                                                          "encoding_format": "float"}, timeout=60).json()
    np.testing.assert_array_equal(np.array(as_floats["data"][0]["embedding"], np.float32),
                                  hooks.embedder.encode(texts[:1])[0])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")


def test_chat_retrieves_cites_and_renders_tools(hooked, tiny_loaded):
    url, _, hooks = hooked
    question = "What does the KV cache store?"
    messages = [{"role": "user", "content": question}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 3, "temperature": 0, "tools": TOOLS}
    out = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
    assert "citations" in out, out
    hits = hooks.rag_index.search([question], 2)[0]
    assert out["citations"] == citations(hits) and out["citations"][0]["doc_id"] == "cache"
    expected = with_tools(rag_messages(question, hits), TOOLS)
    ids, _ = chat_lib.render(tiny_loaded.tokenizer, expected, add_generation_prompt=True, template="chatml")
    assert out["usage"]["prompt_tokens"] == len(ids)
    hooks.tools = TOOLS  # --tools: offered to a request that brings none (and not with tool_choice "none")
    try:
        offered = httpx.post(url + "/v1/chat/completions", json={k: v for k, v in body.items() if k != "tools"},
                             timeout=60).json()
        declined = httpx.post(url + "/v1/chat/completions", json={**body, "tool_choice": "none"}, timeout=60).json()
    finally:
        hooks.tools = None
    assert offered["usage"]["prompt_tokens"] == len(ids)
    plain, _ = chat_lib.render(tiny_loaded.tokenizer, rag_messages(question, hits), add_generation_prompt=True,
                               template="chatml")
    assert declined["usage"]["prompt_tokens"] == len(plain)
    malformed = httpx.post(url + "/v1/chat/completions", json={**body, "tools": [{"type": "function"}]}, timeout=60)
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "tools"


def test_server_tools_load_from_import_paths():
    hooks = Hooks.load(tools="agents.tools:calculator")
    assert [t["function"]["name"] for t in hooks.tools] == ["calculator"]
    with pytest.raises(ValueError):
        Hooks.load(tools="agents.tools:no_such_tool")


def test_a_tool_call_in_the_output_becomes_tool_calls(hooked):
    _, app, _ = hooked
    text = "Let me compute. " + format_tool_call("calculator", {"expression": "3*4"})
    request = ChatRequest(model="tiny", messages=[{"role": "user", "content": "3*4?"}], tools=TOOLS)
    message, finish, _ = asyncio.run(app.state.handlers._answer(Choice(text, [], [], "stop"), request))
    assert finish == "tool_calls" and message["content"].strip() == "Let me compute."
    call = message["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "calculator"
    assert json.loads(call["function"]["arguments"]) == {"expression": "3*4"}


def test_moderation_refuses_flagged_input_and_output(hooked):
    url, app, hooks = hooked
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    steps = app.state.loop.engine.steps
    refused = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a forbidden ask"}],
                                             max_tokens=3)
    assert refused.choices[0].finish_reason == "content_filter" and refused.choices[0].message.content == REFUSAL
    assert app.state.loop.engine.steps == steps  # the model never saw it
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "What is a slot?"}], "max_tokens": 4,
           "temperature": 0}
    answer = client.chat.completions.create(**ask).choices[0]
    assert answer.finish_reason != "content_filter"
    hooks.moderator.blocked.add(answer.message.content)
    try:
        again = client.chat.completions.create(**ask).choices[0]
        streamed = list(client.chat.completions.create(**ask, stream=True))
    finally:
        hooks.moderator.blocked.discard(answer.message.content)
    assert again.finish_reason == "content_filter" and again.message.content == REFUSAL
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == REFUSAL
    assert streamed[-1].choices[0].finish_reason == "content_filter"
    moderation = httpx.post(url + "/v1/moderations", json={"input": ["fine", "forbidden"]}, timeout=60).json()
    assert [r["flagged"] for r in moderation["results"]] == [False, True]
