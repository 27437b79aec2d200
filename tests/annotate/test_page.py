"""The labeling page (annotate/static/) in a real headless browser: Debian's chromium driven by
playwright, against `annotate.app` servers on loopback ports.

Two annotators judge the same preference pairs through their own servers, one with the keyboard
shortcuts and one with clicks; what each file then holds is exactly the judgments made (checked
line by line against `annotate.store.judgment`), undo (key and button) removes the last one and
shows its item again, a restarted server resumes where the annotator left off, and their
agreement is computed from the files. A class-label task is judged with the number keys; a
stale second tab that posts an item already judged shows the server's 409 and moves on to the
current item. Task text with markup is shown as text (no element, no script run), the page
fetches nothing from anywhere but its server and logs no console error. A screenshot is saved
(under tmp_path, and copied to $LMLAB_ARTIFACTS).

Without /usr/bin/chromium the test is skipped, or fails where LMLAB_REQUIRE_BROWSER is set (CI).
"""

import contextlib
import json
import urllib.parse

import pytest

from annotate import agreement, kappa, store, tasks
from annotate.app import create_app
from tests.browser import keep_screenshot, png_size

VIEWPORT = {"width": 1100, "height": 720}
PAIRS = [{"id": f"p{i}", "prompt": f"Which reply to <b>question {i}</b> is better?",
          "a": f"Reply A{i} <img src=x onerror=alert(1)>", "b": f"Reply B{i}\nsecond line"} for i in range(1, 6)]
USER = {"role": "user", "content": "Help me <u>now</u>"}
PAIRS.append({"id": "p6", "a": [USER, {"role": "assistant", "content": "Sure: <b>done</b>"}],
              "b": [USER, {"role": "assistant", "content": "No."}]})  # messages: the prompt is what both share
ITEMS = [{"labels": ["negative", "neutral", "positive"]}] + [
    {"id": f"t{i}", "text": f"Review {i}: <script>alert('x')</script> fine", "text_pair": f"<i>product {i}</i>"}
    for i in range(1, 4)]


@contextlib.contextmanager
def annotator_server(task_path, out, name):
    """`python -m annotate`'s app for annotator `name` on a free port; yields its URL."""
    from inference.serve.testing import running_server

    task_set = tasks.read(str(task_path))
    with running_server(create_app(task_set, store.AnnotatorFile(str(out), name, task_set))) as url:
        yield url


class PageWatch:
    """A page on an annotator's server with everything it requests, logs and opens recorded."""

    def __init__(self, browser, url):
        self.url = url
        self.context = browser.new_context(viewport=VIEWPORT)
        self.page = self.context.new_page()
        self.urls, self.console_errors, self.dialogs = [], [], []
        self.context.on("request", lambda request: self.urls.append(request.url))
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.goto(url)
        self.page.locator("#progress-text").filter(has_text="judged").wait_for()

    def _on_console(self, message):
        # Chromium logs each 4xx as "Failed to load resource"; the conflict test causes one on purpose.
        if message.type == "error" and not message.text.startswith("Failed to load resource: the server responded"):
            self.console_errors.append(message.text)

    def wait_done(self, done, total):
        self.page.locator("#progress-text").filter(has_text=f"{done} / {total} judged").wait_for()
        self.page.wait_for_selector("#undo:enabled" if done else "#undo:disabled")

    def shown_item(self):
        return self.page.get_attribute("#item", "data-id") if self.page.is_visible("#item") else None

    def external(self):
        origin = urllib.parse.urlsplit(self.url)[:2]
        return [u for u in self.urls if urllib.parse.urlsplit(u)[:2] != origin and not u.startswith("data:")]

    def close(self):
        assert not self.external(), f"the page fetched from elsewhere: {self.external()}"
        assert not self.console_errors, self.console_errors
        assert not self.dialogs, f"task text ran as script: {self.dialogs}"
        self.context.close()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _expected_lines(task_path, name, choices):
    task_set = tasks.read(str(task_path))
    items = task_set.by_id()
    return [store.judgment(task_set, items[i], name, c) for i, c in choices]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_annotators_judge_pairs_with_keys_and_clicks_undo_and_resume(browser, tmp_path):
    task_path, out = _write(tmp_path / "pairs.jsonl", PAIRS), tmp_path / "labels"
    # alice, keys: p1 a (1), p2 b (ArrowRight), p3 tie (t); then her server restarts.
    with annotator_server(task_path, out, "alice") as url:
        watch = PageWatch(browser, url)
        page = watch.page
        assert watch.shown_item() == "p1" and page.text_content("#annotator") == "alice"
        # markup in the task text is shown as text: the text boxes hold no element
        assert page.text_content("#prompt") == PAIRS[0]["prompt"]
        assert page.text_content("#response-a") == PAIRS[0]["a"]
        assert page.text_content("#response-b") == PAIRS[0]["b"]
        assert page.eval_on_selector_all("#item .text *", "nodes => nodes.length") == 0
        for done, key in enumerate(("1", "ArrowRight", "t"), start=1):
            page.keyboard.press(key)
            watch.wait_done(done, 6)
        assert watch.shown_item() == "p4"
        path = str(tmp_path / "annotate_page.png")
        page.screenshot(path=path, full_page=True)
        assert png_size(path) == (VIEWPORT["width"], VIEWPORT["height"])
        keep_screenshot(path, "labeling page")
        watch.close()
    assert _lines(out / "alice.jsonl") == _expected_lines(task_path, "alice", [("p1", "a"), ("p2", "b"),
                                                                              ("p3", "tie")])
    # alice again, a new server: resumes at p4; p4 a (ArrowLeft), undo (u) shows p4 again, p4 b (b),
    # p5 skip (s), undo with the button, p5 a (a), p6 b (2).
    with annotator_server(task_path, out, "alice") as url:
        watch = PageWatch(browser, url)
        page = watch.page
        assert watch.shown_item() == "p4" and page.text_content("#progress-text") == "3 / 6 judged"
        assert page.text_content("#last") == "last: item p3 → tie"
        page.keyboard.press("ArrowLeft")
        watch.wait_done(4, 6)
        page.keyboard.press("u")
        watch.wait_done(3, 6)
        assert watch.shown_item() == "p4" and len(_lines(out / "alice.jsonl")) == 3
        for done, key in ((4, "b"), (5, "s")):
            page.keyboard.press(key)
            watch.wait_done(done, 6)
        # messages: one box per message, its role and its text (markup as text)
        assert watch.shown_item() == "p6"
        messages = "#%s .message"
        read = "ms => ms.map(m => [m.querySelector('.role').textContent, m.lastChild.textContent, m.children.length])"
        assert page.eval_on_selector_all(messages % "prompt", read) == [["user", USER["content"], 1]]
        assert page.eval_on_selector_all(messages % "response-a", read) == [["assistant", "Sure: <b>done</b>", 1]]
        assert page.eval_on_selector_all(messages % "response-b", read) == [["assistant", "No.", 1]]
        page.click("#undo")
        watch.wait_done(4, 6)
        assert watch.shown_item() == "p5"
        page.keyboard.press("a")
        watch.wait_done(5, 6)
        page.keyboard.press("2")
        watch.wait_done(6, 6)
        assert page.is_visible("#finished") and not page.is_visible("#item")
        assert page.is_disabled("[data-choice='a']")
        watch.close()
    alice = [("p1", "a"), ("p2", "b"), ("p3", "tie"), ("p4", "b"), ("p5", "a"), ("p6", "b")]
    assert _lines(out / "alice.jsonl") == _expected_lines(task_path, "alice", alice)
    # bob, clicks, on his own server writing beside alice's file.
    bob = [("p1", "a"), ("p2", "a"), ("p3", "tie"), ("p4", "b"), ("p5", "skip"), ("p6", "a")]
    with annotator_server(task_path, out, "bob") as url:
        watch = PageWatch(browser, url)
        for done, (item, choice) in enumerate(bob, start=1):
            assert watch.shown_item() == item
            watch.page.click(f"#choices [data-choice='{choice}']")
            watch.wait_done(done, 6)
        watch.close()
    assert _lines(out / "bob.jsonl") == _expected_lines(task_path, "bob", bob)
    result = agreement.report(store.read_directory(str(out)))
    (pair,) = result["pairs"]
    want = kappa.cohen_kappa(["a", "b", "tie", "b", "b"], ["a", "a", "tie", "b", "a"])  # bob skipped p5
    assert pair["items"] == 5 and pair["kappa"] == pytest.approx(want.kappa, abs=1e-12)


def test_labels_by_number_keys_and_a_stale_tab_sees_the_conflict(browser, tmp_path):
    task_path, out = _write(tmp_path / "items.jsonl", ITEMS), tmp_path / "labels"
    with annotator_server(task_path, out, "carol") as url:
        first, stale = PageWatch(browser, url), PageWatch(browser, url)
        page = first.page
        assert page.eval_on_selector_all("#choices button", "bs => bs.map(b => b.dataset.choice)") == [
            "negative", "neutral", "positive", "skip"]
        assert page.text_content("#text") == ITEMS[1]["text"] and page.text_content("#text-pair") == ITEMS[1]["text_pair"]
        assert page.eval_on_selector_all("#item .text *", "nodes => nodes.length") == 0
        page.keyboard.press("3")
        first.wait_done(1, 3)
        # the second tab still shows t1: its click is refused (409), shown, and the tab moves on to t2
        assert stale.shown_item() == "t1"
        stale.page.click("#choices [data-choice='negative']")
        stale.page.wait_for_selector("#error:not([hidden])")
        assert stale.page.text_content("#error") == (
            "error 409: item 't1' is not the current item (the current item is 't2'); reload")
        stale.page.locator("#item[data-id='t2']").wait_for()
        for done, key in ((2, "1"), (3, "2"), (2, "Backspace"), (3, "2")):  # Backspace undoes too
            page.keyboard.press(key)
            first.wait_done(done, 3)
            if key == "Backspace":
                assert first.shown_item() == "t3"
        assert page.is_visible("#finished")
        first.close()
        stale.close()
    assert _lines(out / "carol.jsonl") == _expected_lines(task_path, "carol", [
        ("t1", "positive"), ("t2", "negative"), ("t3", "neutral")])
