"""The chat page (inference/serve/static/) in a real headless browser: Debian's chromium driven by
playwright, against the server on a tiny model.

Checked against the official `openai` client on the same server: the answer the page streams is the
API's greedy answer for the same messages, turn after turn (the page sends the conversation back);
the page really streams (its answer is seen growing: several partial texts, each a prefix of the
final one); OpenAI-shaped errors are shown (401 without the API key, 400 for a request the server
rejects) and a failed turn is undone; the page fetches nothing from anywhere but its server and
logs no console error. A screenshot is saved (under tmp_path, and copied to $LMLAB_ARTIFACTS).

Without /usr/bin/chromium the test is skipped, or fails where LMLAB_REQUIRE_BROWSER is set (CI).
"""

import json
import re
import time
import urllib.parse
import urllib.request

import pytest

from tests.browser import keep_screenshot, png_size

API_KEY = "page-test-key"
SYSTEM = "You answer in one short sentence."
TURNS = ("What does a cache hold?", "And a <b>slot</b>?")  # markup the page must show as text
MAX_TOKENS = 24
LONG = 4000  # tokens asked for in the stop test: far more than can arrive before the click
VIEWPORT = {"width": 1100, "height": 720}

# Records every text the last assistant message shows, as the page writes it.
RECORD_STATES = """() => {
  window.answerStates = [];
  const log = document.getElementById('messages');
  new MutationObserver(() => {
    const items = log.querySelectorAll('.message.assistant .content');
    if (!items.length) return;
    const text = items[items.length - 1].textContent;
    const states = window.answerStates;
    if (states[states.length - 1] !== text) states.push(text);
  }).observe(log, {childList: true, subtree: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def tiny_chat_checkpoint(tmp_path_factory):
    """A Hugging Face directory: a 2-layer LLaMA with random weights (scaled up so that greedy choices have
    clear margins) and a byte-level BPE trained on pydoc prose, with ChatML's tokens and template."""
    import tokenizers
    import torch
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from data import pydoc_chat
    from data.chat import BUILTIN_TEMPLATES

    directory = tmp_path_factory.mktemp("tiny_chat")
    text = "\n".join(m["content"] for r in pydoc_chat.conversations()[:60] for m in r["messages"])
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": BUILTIN_TEMPLATES["chatml"]}))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=4096, bos_token_id=0, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.2 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return str(directory)


@pytest.fixture(scope="module")
def server(tiny_chat_checkpoint):
    from inference.load import load
    from inference.serve.app import create_app
    from inference.serve.testing import running_server

    app = create_app(load(tiny_chat_checkpoint), model_name="tiny-chat", api_key=API_KEY, num_slots=2,
                     max_len=4096)
    with running_server(app) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0)


class PageWatch:
    """A page on the server with everything it requests, posts and logs recorded."""

    def __init__(self, browser, base_url):
        self.context = browser.new_context(viewport=VIEWPORT)
        self.page = self.context.new_page()
        self.urls, self.chat_bodies, self.console_errors = [], [], []
        self.context.on("request", self._on_request)
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        self.page.goto(base_url)

    def _on_console(self, message):
        # Chromium logs each 4xx as "Failed to load resource"; the tests cause those on purpose.
        if message.type == "error" and not message.text.startswith("Failed to load resource: the server responded"):
            self.console_errors.append(message.text)

    def _on_request(self, request):
        self.urls.append(request.url)
        if request.method == "POST" and request.url.endswith("/v1/chat/completions"):
            self.chat_bodies.append(json.loads(request.post_data))

    def send(self, text, turn):
        """Types `text`, sends it and waits until the `turn`-th answer is complete; returns the states
        the answer went through."""
        self.page.evaluate(RECORD_STATES)
        self.page.fill("#prompt", text)
        self.page.click("#send")
        # (selectors, not wait_for_function: the page's CSP forbids the string eval that polling uses)
        self.page.locator("#messages .message.assistant:not(.streaming)").nth(turn - 1).wait_for(
            state="attached", timeout=60_000)
        self.page.wait_for_selector("#send:enabled")
        return self.page.evaluate("window.answerStates")

    def messages(self):
        return self.page.eval_on_selector_all(
            "#messages .message", "items => items.map(m => [m.dataset.role, m.querySelector('.content').textContent])")


def _greedy(client, model, messages):
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    return reply.choices[0].message.content


def _metric(base_url, name):
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.split("{")[0].split(" ")[0] == name)


def test_chat_page_streams_the_apis_greedy_answers_and_keeps_the_conversation(browser, server, client, tmp_path):
    watch = PageWatch(browser, server)
    page = watch.page
    # Without the key the model list is refused, and the page shows the server's 401 message.
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error").startswith("models: error 401: ")
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#model option", state="attached")
    assert page.is_hidden("#error")
    models = [m.id for m in client.models.list().data]
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == models
    model = page.input_value("#model")

    page.fill("#system", SYSTEM)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(MAX_TOKENS))
    history = [{"role": "system", "content": SYSTEM}]
    for turn, question in enumerate(TURNS, start=1):
        states = watch.send(question, turn)
        history.append({"role": "user", "content": question})
        answer = watch.messages()[-1][1]
        # The page posts the whole conversation with its settings, and shows what the API answers.
        body = watch.chat_bodies[-1]
        assert body["messages"] == history and body["stream"] is True
        assert (body["model"], body["temperature"], body["max_tokens"]) == (model, 0, MAX_TOKENS)
        assert answer == _greedy(client, model, history)
        # It streamed: the answer grew through several partial texts, each a prefix of the final one.
        partial = [s for s in states if s and s != answer]
        print(f"turn {turn}: the answer ({len(answer)} characters) was seen in {len(partial)} partial states")
        assert len(partial) >= 2, f"the answer appeared in {len(partial)} partial steps: {states}"
        assert all(answer.startswith(s) for s in states), states
        history.append({"role": "assistant", "content": answer})
    assert watch.messages() == [[m["role"], m["content"]] for m in history[1:]]
    assert page.eval_on_selector_all("#messages .content *", "nodes => nodes.length") == 0  # text, never HTML
    stats = page.text_content("#stats")
    assert re.fullmatch(rf"\d+ prompt \+ {MAX_TOKENS} completion tokens · first token after \d+ ms · [\d.]+ tokens/s · "
                        r"finish: length", stats), stats

    path = str(tmp_path / "chat_page.png")
    page.screenshot(path=path, full_page=True)
    assert png_size(path) == (VIEWPORT["width"], VIEWPORT["height"])
    keep_screenshot(path, "chat page")

    origin = urllib.parse.urlsplit(server)[:2]
    external = [u for u in watch.urls if urllib.parse.urlsplit(u)[:2] != origin and not u.startswith("data:")]
    assert not external, f"the page fetched from elsewhere: {external}"
    assert not watch.console_errors, watch.console_errors
    watch.context.close()


def test_chat_page_shows_a_rejected_request_and_undoes_the_turn(browser, server, client):
    import openai

    watch = PageWatch(browser, server)
    page = watch.page
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#model option", state="attached")
    stops = ["\n", ".", "!", "?", ";"]  # one more than OpenAI's 4: the page passes them on, the server answers 400
    page.fill("#stop", "\\n\n.\n!\n?\n;")  # the first line is a typed \n: a line break
    page.fill("#prompt", TURNS[0])
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=page.input_value("#model"), stop=stops,
                                       messages=[{"role": "user", "content": TURNS[0]}])
    assert watch.chat_bodies[-1]["stop"] == stops
    assert page.text_content("#error") == f"error 400: {raised.value.body['message']}"
    assert watch.messages() == []  # the turn is undone, its text back in the box
    assert page.input_value("#prompt") == TURNS[0]
    assert not page.is_disabled("#send")
    page.reload()  # the key stays for the tab (sessionStorage): the models load without typing it again
    page.wait_for_selector("#model option", state="attached")
    assert page.input_value("#api-key") == API_KEY and page.is_hidden("#error")
    watch.context.close()


def test_chat_page_stop_button_cuts_the_answer_and_frees_the_request(browser, server, client):
    watch = PageWatch(browser, server)
    page = watch.page
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#model option", state="attached")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(LONG))
    cancelled = _metric(server, "lmlab_requests_cancelled_total")
    page.fill("#prompt", TURNS[0])
    page.click("#send")
    page.locator("#messages .message.streaming .content").filter(has_text=re.compile(".")).wait_for()
    page.click("#stop-generation")
    page.wait_for_selector("#send:enabled")
    (_, question), (_, stopped) = watch.messages()
    assert question == TURNS[0] and stopped
    finish = page.get_attribute("#messages .message.assistant", "data-finish")
    assert finish == "stopped", f"the answer ended ({finish}) before the stop button was clicked: {page.text_content('#stats')}"
    # The server saw the page go away and cancelled the request (its slot is free again).
    deadline = time.monotonic() + 30
    while _metric(server, "lmlab_requests_cancelled_total") < cancelled + 1 or _metric(server, "lmlab_running_requests"):
        assert time.monotonic() < deadline, "the server did not cancel the request the page stopped"
        time.sleep(0.05)
    # What the page kept is the start of the API's greedy answer, which went on past it.
    reference = ""
    with client.chat.completions.create(model=page.input_value("#model"), temperature=0, max_tokens=LONG, stream=True,
                                        messages=[{"role": "user", "content": TURNS[0]}]) as stream:
        for chunk in stream:
            reference += "".join(c.delta.content or "" for c in chunk.choices)
            if len(reference) > len(stopped):
                break
    assert reference.startswith(stopped) and len(reference) > len(stopped), (stopped, reference)
    watch.context.close()
