"""The OpenAI-compatible server against the official `openai` client: answers equal
`inference.generate`, streams add up to the same text, concurrency changes nothing, and every
error has OpenAI's shape and status.

Two servers on the session's tiny Llama: `server` (4 slots) for answers, `gated` (1 slot, a
queue of 1, a 1 s timeout, an API key, a 4 KiB body limit) whose engine steps only when the
test allows it, so queueing, timeouts and disconnects happen in a known order without sleeps.
"""

import asyncio
import json
import re
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest

from data import chat as chat_lib
from inference.generate import generate
from inference.serve.app import create_app
from inference.serve.testing import running_server

KEY = "sekrit-key"


class Gate:
    """Lets the engine thread take `allow(k)` steps (None: any number)."""

    def __init__(self):
        self.cond, self.permits = threading.Condition(), None

    def wait(self):
        with self.cond:
            self.cond.wait_for(lambda: self.permits is None or self.permits > 0)
            if self.permits is not None:
                self.permits -= 1

    def close(self):
        with self.cond:
            self.permits = 0

    def allow(self, k=None):
        with self.cond:
            self.permits = None if k is None else self.permits + k
            self.cond.notify_all()


@pytest.fixture(scope="module")
def server(tiny_loaded):
    app = create_app(tiny_loaded, model_name="tiny", num_slots=4, max_len=128, chat_template="chatml")
    with running_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def gated(tiny_loaded):
    app = create_app(tiny_loaded, model_name="tiny", num_slots=1, max_queue=1, timeout_s=1.0, api_key=KEY,
                     max_body_bytes=4096, chat_template="chatml", max_len=128)
    engine, gate = app.state.loop.engine, Gate()
    step = engine.step

    def gated_step():
        gate.wait()
        return step()

    engine.step = gated_step
    with running_server(app) as url:
        yield url, app, gate
        gate.allow()


def _client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def _metrics(url) -> dict[str, float]:
    """The samples of /metrics, after checking the text is valid Prometheus exposition."""
    text = httpx.get(url + "/metrics", timeout=60).text
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line.startswith("# HELP "):
            continue
        else:
            m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_]\w*="(?:[^"\\]|\\.)*",?)*\})? (\S+)', line)
            assert m, f"not a Prometheus sample line: {line!r}"
            base = re.sub(r"_(bucket|sum|count)$", "", m.group(1))
            assert m.group(1) in types or base in types, f"{m.group(1)} has no TYPE line"
            samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    for name, kind in types.items():
        if kind == "histogram":
            buckets = [v for k, v in samples.items() if k.startswith(name + "_bucket")]
            assert buckets == sorted(buckets) and buckets[-1] == samples[name + "_count"]
    return samples


def _until(predicate, what, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _prompt_ids(tokenizer, text):
    start = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return start + tokenizer.encode(text)


def _reference(loaded, ids, n, **sampling):
    eos = loaded.tokenizer.eos_id
    tokens = generate(loaded.model, loaded.params, [ids], max_new_tokens=n, stop_tokens=(eos,), **sampling)[0]
    return tokens, loaded.tokenizer.decode([t for t in tokens if t != eos])


def test_greedy_completion_and_chat_equal_generate_and_streams_add_up(server, tiny_loaded):
    url, _ = server
    client = _client(url)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    tokens, text = _reference(tiny_loaded, _prompt_ids(tiny_loaded.tokenizer, "The cache"), 20)
    out = client.completions.create(model="tiny", prompt="The cache", max_tokens=20, temperature=0)
    assert out.choices[0].text == text and out.usage.completion_tokens == len(tokens)
    assert out.choices[0].finish_reason == ("stop" if tokens[-1] == tiny_loaded.tokenizer.eos_id else "length")
    chunks = list(client.completions.create(model="tiny", prompt="The cache", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == len(tokens)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a slot?"}]
    ids, _ = chat_lib.render(tiny_loaded.tokenizer, messages, add_generation_prompt=True, template="chatml")
    tokens, text = _reference(tiny_loaded, ids, 24)
    text = text.split("<|im_end|>")[0]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    assert out.choices[0].message.content == text and out.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text


def test_32_concurrent_requests_of_mixed_lengths_equal_each_alone(server):
    url, _ = server
    words = "the keys and values of every token seen so far join a free slot".split()
    jobs = [(" ".join(words[: 1 + i % 13]), 1 + (7 * i) % 23, 0.0 if i % 2 else 0.9, i) for i in range(32)]

    def ask(client, prompt, max_tokens, temperature, seed):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                         temperature=temperature, seed=seed)

    async def together():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        return await asyncio.gather(*(ask(client, *job) for job in jobs))

    concurrent = asyncio.run(together())
    client = _client(url)
    for job, out in zip(jobs, concurrent):
        alone = ask(client, *job)
        assert out.choices[0].text == alone.choices[0].text, job
        assert out.usage.completion_tokens == alone.usage.completion_tokens <= job[1]
    steps = _metrics(url)["lmlab_engine_steps_total"]
    assert steps < sum(o.usage.completion_tokens for o in concurrent) * 2  # requests shared decode steps


def test_n_choices_take_seeds_in_turn_and_stop_strings_are_cut(server):
    client = _client(server[0])
    many = client.completions.create(model="tiny", prompt="A request", max_tokens=12, temperature=1.0, seed=5, n=3)
    texts = [c.text for c in sorted(many.choices, key=lambda c: c.index)]
    for i, text in enumerate(texts):
        alone = client.completions.create(model="tiny", prompt="A request", max_tokens=12, temperature=1.0,
                                          seed=5 + i)
        assert alone.choices[0].text == text
    assert len(set(texts)) > 1 and many.usage.completion_tokens == sum(
        client.completions.create(model="tiny", prompt="A request", max_tokens=12, temperature=1.0,
                                  seed=5 + i).usage.completion_tokens for i in range(3))

    full = client.completions.create(model="tiny", prompt="The cache", max_tokens=30, temperature=0).choices[0].text
    start = next(i for i in range(3, len(full) - 1) if full[i:i + 2].isprintable() and "\ufffd" not in full[i:i + 2])
    stop = full[start:start + 2]
    cut = client.completions.create(model="tiny", prompt="The cache", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model="tiny", prompt="The cache", max_tokens=30, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full[:full.find(stop)]


def _log_softmax64(loaded, ids, tokens):
    """float64 log-softmax of the model's logits (one forward over prompt + output) at each new token."""
    full = np.asarray(ids + tokens, np.int32)[None]
    logits = np.asarray(loaded.model.apply({"params": loaded.params}, full,
                                           positions=np.arange(full.shape[1])[None]), np.float64)[0]
    logits = logits[len(ids) - 1: len(ids) - 1 + len(tokens)]
    shifted = logits - logits.max(-1, keepdims=True)
    # float32 rounding of logits of this size, over the layers and the cache/no-cache orders
    tol = 64 * np.finfo(np.float32).eps * (1 + np.abs(logits).max())
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)), tol


def test_logprobs_equal_log_softmax_of_the_models_logits(server, tiny_loaded):
    client = _client(server[0])
    # the shapes of the first test (its compiled programs are reused)
    out = client.completions.create(model="tiny", prompt="The cache", max_tokens=20, temperature=0, logprobs=5)
    ids = _prompt_ids(tiny_loaded.tokenizer, "The cache")
    tokens, _ = _reference(tiny_loaded, ids, 20)
    reference, tol = _log_softmax64(tiny_loaded, ids, tokens)
    got = out.choices[0].logprobs
    np.testing.assert_allclose(got.token_logprobs, reference[np.arange(len(tokens)), tokens], atol=tol)
    # top_logprobs is keyed by token text (tokens that decode alike share a key, as in OpenAI's format)
    assert all(1 <= len(top) <= 5 and abs(max(top.values()) - row.max()) <= tol
               for top, row in zip(got.top_logprobs, reference))

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a slot?"}]
    ids, _ = chat_lib.render(tiny_loaded.tokenizer, messages, add_generation_prompt=True, template="chatml")
    tokens, _ = _reference(tiny_loaded, ids, 24)
    reference, tol = _log_softmax64(tiny_loaded, ids, tokens)
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == len(tokens)
    np.testing.assert_allclose([c.logprob for c in content], reference[np.arange(len(tokens)), tokens], atol=tol)
    np.testing.assert_allclose([[t.logprob for t in c.top_logprobs] for c in content],
                               -np.sort(-reference, axis=-1)[:, :3], atol=tol)


def test_bad_requests_get_openai_errors(server):
    url, app = server
    client = _client(url)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    for bad in ({"temperature": 3.0}, {"n": 0}, {"max_tokens": 1000}, {"unknown_field": 2}, {"top_p": 0.0},
                {"stop": [""]}, {"logprobs": 21}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body=bad)
    for method, path, body in (("POST", "/v1/completions", {"model": "tiny"}), ("GET", "/v1/nothing", None),
                               ("POST", "/v1/chat/completions", {"model": "tiny", "messages": []})):
        response = httpx.request(method, url + path, json=body, timeout=60)
        error = response.json()["error"]
        assert response.status_code == (404 if "nothing" in path else 400)
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    broken = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"},
                        timeout=60)
    assert broken.status_code == 400 and "error" in broken.json()


def test_a_server_fault_is_500_without_a_traceback(server, monkeypatch):
    url, app = server

    def explode(prompt):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(app.state.handlers, "prompt_ids", explode)
    response = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert "secret" not in response.text and "Traceback" not in response.text


def test_api_key_and_body_limit(gated):
    url, _, _ = gated
    with pytest.raises(openai.AuthenticationError):
        _client(url, "wrong").models.list()
    assert httpx.get(url + "/v1/models", timeout=60).status_code == 401
    assert httpx.get(url + "/v1/nothing", timeout=60).status_code == 401  # no route list for strangers
    assert [m.id for m in _client(url, KEY).models.list().data] == ["tiny"]
    assert httpx.get(url + "/health", timeout=60).status_code == 200
    big = {"model": "tiny", "prompt": "x" * 5000, "max_tokens": 1}
    response = httpx.post(url + "/v1/completions", json=big, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_full_queue_429_timeout_408_and_disconnect_free_their_slots(gated):
    url, app, gate = gated
    client = _client(url, KEY)
    gate.close()
    errors = []

    def hang():
        try:
            client.completions.create(model="tiny", prompt="The cache", max_tokens=50, temperature=0)
        except openai.APIStatusError as e:
            errors.append(e)

    threads = [threading.Thread(target=hang) for _ in range(2)]
    for t in threads:
        t.start()
    _until(lambda: app.state.loop.outstanding == 2, "two queued requests")
    response = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
    assert response.json()["error"]["type"] == "rate_limit_error"
    for t in threads:
        t.join(timeout=60)
    assert [e.status_code for e in errors] == [408, 408] and all("timeout" in e.message for e in errors)
    gate.allow()
    _until(lambda: app.state.loop.outstanding == 0 and not app.state.loop.engine.busy, "the slots to free")

    gate.close()
    before = _metrics(url)["lmlab_requests_cancelled_total"]
    body = {"model": "tiny", "prompt": "The cache", "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        gate.allow(2)
        first = next(r.iter_lines())
        assert json.loads(first.removeprefix("data: "))["choices"][0]["index"] == 0
        assert app.state.loop.running == 1
    gate.allow(3)  # the client left: the next drain cancels its request
    _until(lambda: app.state.loop.outstanding == 0, "the disconnected request to be cancelled")
    metrics = _metrics(url)
    assert metrics["lmlab_running_requests"] == 0 and metrics["lmlab_requests_cancelled_total"] == before + 1
    assert len(app.state.loop.engine.results) == 0 and app.state.loop.engine.steps < 100
    gate.allow()
    assert _client(url, KEY).completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_a_client_that_leaves_a_one_shot_request_frees_its_slot(gated, monkeypatch):
    url, app, gate = gated
    monkeypatch.setattr(app.state.handlers, "timeout_s", 600.0)  # only the client's leaving can end it
    gate.close()
    before = _metrics(url)["lmlab_requests_cancelled_total"]
    body = {"model": "tiny", "prompt": "The cache", "max_tokens": 100, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=1.0)
    gate.allow(1)  # the step under way ends; the next drain sees the cancellation
    _until(lambda: app.state.loop.outstanding == 0, "the abandoned request to be cancelled")
    assert _metrics(url)["lmlab_requests_cancelled_total"] == before + 1
    gate.allow()


def test_metrics_count_requests_tokens_and_latencies(server):
    url, _ = server
    _client(url).completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
    metrics = _metrics(url)
    assert metrics['lmlab_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert metrics["lmlab_time_to_first_token_seconds_count"] >= 1
    assert metrics["lmlab_inter_token_latency_seconds_count"] >= 2
    assert metrics["lmlab_generation_tokens_total"] >= 3
    assert {"lmlab_queue_length", "lmlab_running_requests", "lmlab_generation_tokens_per_second"} <= set(metrics)
    assert jax.devices()  # the engine shares this process's devices
