"""The labeling app without a browser (annotate/tasks.py, store.py, app.py): FastAPI's TestClient
and a real server.

Each judgment is one line in DIR/NAME.jsonl the moment it is made, in the form the trainer's
readers take (a/b pairs pass `data.preference.parse_paired` with chosen = the preferred
response; labeled items pass `data.tasks.check`); undo removes exactly the last line; a new
server resumes at the first item not judged; a partial last line (a crash mid-write) is cut
off; a second server for the same annotator is refused; concurrent posts of one item record
it once; the API's refusals (400, 404, 409) change nothing. Bad task files, label sets and
annotator files fail at start in one line naming the problem, as does the command line.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from fastapi.testclient import TestClient

from annotate import app as app_lib
from annotate import store, tasks
from data import preference
from data import tasks as data_tasks
from tests.cli_output import REPO, assert_one_line_error, run_module

PAIRS = [{"id": i, "prompt": f"Question {i} <b>bold?</b>", "a": f" answer A{i}", "b": f" answer B{i}"}
         for i in range(1, 6)]
ITEMS = [{"labels": ["negative", "neutral", "positive"]}] + [
    {"id": f"t{i}", "text": f"Review {i}: <script>alert(1)</script>", "text_pair": f"Product {i}"} for i in range(6)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture
def pair_file(tmp_path):
    return _write(tmp_path / "pairs.jsonl", PAIRS)


@pytest.fixture
def label_file(tmp_path):
    return _write(tmp_path / "items.jsonl", ITEMS)


def _client(task_path, out, name, labels=()):
    task_set = tasks.read(task_path, labels)
    return TestClient(app_lib.create_app(task_set, store.AnnotatorFile(str(out), name, task_set)))


def _label(client, choice):
    state = client.get("/api/state").json()
    response = client.post("/api/label", json={"id": state["item"]["id"], "choice": choice})
    assert response.status_code == 200, response.json()
    return response.json()


def test_pair_judgments_are_lines_the_preference_reader_takes(pair_file, tmp_path):
    out = tmp_path / "out"
    with _client(pair_file, out, "alice") as client:
        state = client.get("/api/state").json()
        assert (state["kind"], state["done"], state["total"], state["choices"]) == (
            "preference", 0, 5, ["a", "b", "tie", "skip"])
        assert state["item"] == {"id": "1", "prompt": PAIRS[0]["prompt"], "a": PAIRS[0]["a"], "b": PAIRS[0]["b"]}
        for choice in ("a", "b", "tie", "skip"):
            state = _label(client, choice)
        assert state["done"] == 4 and state["item"]["id"] == "5" and state["last"] == {"id": "4", "choice": "skip"}
    lines = _lines(out / "alice.jsonl")
    assert [(x["id"], x["choice"], x["annotator"]) for x in lines] == [
        ("1", "a", "alice"), ("2", "b", "alice"), ("3", "tie", "alice"), ("4", "skip", "alice")]
    for line, source in zip(lines[:2], PAIRS[:2]):
        prompt, chosen, rejected, _ = preference.parse_paired(line, preference.PreferenceConfig())
        better, worse = (source["a"], source["b"]) if line["choice"] == "a" else (source["b"], source["a"])
        assert (prompt, chosen, rejected) == (source["prompt"], better, worse)
    assert {k: lines[2][k] for k in ("prompt", "a", "b")} == {k: PAIRS[2][k] for k in ("prompt", "a", "b")}
    # The two decisive lines alone are a preference file the reward and DPO objectives read.
    decisive = _write(tmp_path / "decisive.jsonl", lines[:2])
    assert preference.check_lines([decisive], preference.PreferenceConfig()) == 2


def test_label_judgments_are_lines_the_task_reader_takes(label_file, tmp_path):
    out = tmp_path / "out"
    with _client(label_file, out, "bob") as client:
        state = client.get("/api/state").json()
        assert state["choices"] == ["negative", "neutral", "positive", "skip"] and state["kind"] == "label"
        assert state["item"] == {"id": "t0", "text": ITEMS[1]["text"], "text_pair": ITEMS[1]["text_pair"]}
        for choice in ("positive", "negative", "skip", "neutral", "positive", "negative"):
            state = _label(client, choice)
        assert state["item"] is None and state["done"] == 6
    lines = _lines(out / "bob.jsonl")
    assert [x.get("label") for x in lines] == ["positive", "negative", None, "neutral", "positive", "negative"]
    labeled = _write(tmp_path / "labeled.jsonl", [x for x in lines if x["choice"] != "skip"])
    config = data_tasks.TaskConfig(source=f"files:{labeled}", text_pair_key="text_pair", validation_fraction=0.5,
                                   labels=("negative", "neutral", "positive"))
    data_tasks.check(config)
    assert [r.fields["label"] for r in data_tasks.read_records(config, "train")[0]] == ["positive", "neutral",
                                                                                         "negative"]


def test_undo_removes_the_last_line_and_a_new_server_resumes(pair_file, tmp_path):
    out = tmp_path / "out"
    with _client(pair_file, out, "alice") as client:
        for choice in ("a", "b", "a"):
            _label(client, choice)
        before = (out / "alice.jsonl").read_bytes()
        state = client.post("/api/undo").json()
        assert state["item"]["id"] == "3" and state["done"] == 2 and state["last"] == {"id": "2", "choice": "b"}
        assert before.startswith((out / "alice.jsonl").read_bytes())
        assert [x["id"] for x in _lines(out / "alice.jsonl")] == ["1", "2"]
        _label(client, "tie")
    with _client(pair_file, out, "alice") as client:  # restarted: resumes at item 4
        state = client.get("/api/state").json()
        assert state["item"]["id"] == "4" and state["done"] == 3 and state["last"] == {"id": "3", "choice": "tie"}
        for _ in range(3):
            assert client.post("/api/undo").status_code == 200
        response = client.post("/api/undo")
        assert response.status_code == 409 and "no judgment to undo" in response.json()["error"]
    assert (out / "alice.jsonl").read_bytes() == b""


def test_a_partial_last_line_is_cut_off_on_restart(pair_file, tmp_path):
    out = tmp_path / "out"
    with _client(pair_file, out, "alice") as client:
        _label(client, "a")
    with open(out / "alice.jsonl", "ab") as f:
        f.write(b'{"prompt": "Question 2", "cho')  # a write a crash cut short
    assert [x["id"] for x in store.read_directory(str(out))["alice"]] == ["1"]  # readers ignore it
    with _client(pair_file, out, "alice") as client:
        assert client.get("/api/state").json()["item"]["id"] == "2"
        _label(client, "b")
    assert [x["id"] for x in _lines(out / "alice.jsonl")] == ["1", "2"]


def test_refusals_change_nothing(pair_file, tmp_path):
    out = tmp_path / "out"
    with _client(pair_file, out, "alice") as client:
        cases = [({"id": "1", "choice": "c"}, 400, "not one of the choices"),
                 ({"id": "99", "choice": "a"}, 404, "not in the task file"),
                 ({"id": "2", "choice": "a"}, 409, "the current item is '1'"),
                 ({"id": "1"}, 422, None)]
        for body, status, fragment in cases:
            response = client.post("/api/label", json=body)
            assert response.status_code == status, response.text
            if fragment:
                assert fragment in response.json()["error"]
        assert client.get("/api/state").json()["done"] == 0
        # The page's HTML is served as is; its text is filled in by the script, never as HTML.
        page = client.get("/")
        assert page.status_code == 200 and "<script src=\"/static/annotate.js\" defer></script>" in page.text
    assert (out / "alice.jsonl").read_bytes() == b""


def test_a_second_server_for_the_same_annotator_is_refused(pair_file, tmp_path):
    task_set = tasks.read(pair_file)
    first = store.AnnotatorFile(str(tmp_path), "alice", task_set)
    with pytest.raises(ValueError, match="open in another `python -m annotate` server for annotator alice"):
        store.AnnotatorFile(str(tmp_path), "alice", task_set)
    other = store.AnnotatorFile(str(tmp_path), "bob", task_set)  # another annotator: fine
    first.close()
    store.AnnotatorFile(str(tmp_path), "alice", task_set).close()  # released with the first
    other.close()


def test_concurrent_posts_of_one_item_record_it_once(pair_file, tmp_path):
    from inference.serve.testing import running_server

    task_set = tasks.read(pair_file)
    annotator_file = store.AnnotatorFile(str(tmp_path), "alice", task_set)
    statuses = []

    def post(url, choice):
        request = urllib.request.Request(url + "/api/label", data=json.dumps({"id": "1", "choice": choice}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                statuses.append(response.status)
        except urllib.error.HTTPError as e:
            statuses.append(e.code)

    with running_server(app_lib.create_app(task_set, annotator_file)) as url:
        threads = [threading.Thread(target=post, args=(url, "ab"[i % 2])) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(statuses) == [200] + [409] * 7
    assert [x["id"] for x in _lines(tmp_path / "alice.jsonl")] == ["1"]


@pytest.mark.parametrize("rows, labels, fragment", [
    ([{"prompt": "p", "a": "x", "b": "y"}], (), 'pairs.jsonl:1: "id" must be a non-empty string or an integer'),
    ([{"id": 1, "prompt": "p", "a": "x", "b": "y"}, {"id": "1", "prompt": "q", "a": "x", "b": "y"}], (),
     "pairs.jsonl:2: \"id\" '1' is used by an earlier row"),
    ([{"id": 1, "prompt": "p", "a": "x", "b": "y"}, {"id": 2, "text": "t"}], (),
     "pairs.jsonl:2 is a label task but line 1 is a preference task; a task file holds one kind"),
    ([{"id": 1, "prompt": "p", "a": "x"}], (), 'pairs.jsonl:1: missing key "b"'),
    ([{"id": 1, "prompt": "p", "a": "same", "b": "same"}], (), '"a" and "b" are identical'),
    ([{"id": 1, "prompt": "p", "a": "x", "b": [{"role": "assistant", "content": "y"}]}], (),
     "must all be strings or all lists of messages"),
    ([{"id": 1, "question": "p"}], (), "found keys ['id', 'question']"),
    ([{"id": 1, "text": "t"}], (), "no label set; pass --labels=a,b,c"),
    ([{"id": 1, "text": "  "}], ("x", "y"), '"text" must be a non-empty string'),
    ([{"labels": ["x", "y"]}, {"id": 1, "text": "t"}], ("y", "x"), "--labels=y,x differs from the label set"),
    ([{"id": 1, "text": "t"}], ("x", "skip"), 'the label "skip" is reserved'),
    ([{"id": 1, "text": "t"}], ("x", "x"), "repeats a name"),
    ([{"id": 1, "prompt": "p", "a": "x", "b": "y"}], ("x", "y"), "--labels and a {\"labels\": ...} line apply to"),
])
def test_bad_task_files_fail_in_one_line(tmp_path, rows, labels, fragment):
    path = _write(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(ValueError) as raised:
        tasks.read(path, labels)
    assert fragment in str(raised.value) and "\n" not in str(raised.value)


def test_messages_pairs_take_their_shared_prompt(tmp_path):
    user = {"role": "user", "content": "Hi <i>there</i>"}
    path = _write(tmp_path / "chat.jsonl", [{"id": "m", "a": [user, {"role": "assistant", "content": "Hello."}],
                                              "b": [user, {"role": "assistant", "content": "Go away."}]}])
    (item,) = tasks.read(path).items
    assert item.fields == {"prompt": [user], "a": [{"role": "assistant", "content": "Hello."}],
                           "b": [{"role": "assistant", "content": "Go away."}]}


def test_annotator_files_that_do_not_match_the_tasks_are_refused(label_file, pair_file, tmp_path):
    out = tmp_path / "out"
    with _client(label_file, out, "bob") as client:
        _label(client, "neutral")
    fewer = _write(tmp_path / "fewer.jsonl", [{"labels": ["negative", "positive"]}] + ITEMS[1:])
    task_set = tasks.read(fewer)
    with pytest.raises(ValueError, match=r"bob.jsonl:1: 'neutral' is not one of the choices .* \(--labels\)"):
        store.AnnotatorFile(str(out), "bob", task_set)
    changed = [dict(r) for r in ITEMS]
    changed[1]["text"] = "Another text"
    with pytest.raises(ValueError, match="bob.jsonl:1: item 't0' differs from the task file's row"):
        store.AnnotatorFile(str(out), "bob", tasks.read(_write(tmp_path / "changed.jsonl", changed)))
    with pytest.raises(ValueError, match="bob.jsonl:1: item 't0' is not in the task file"):
        store.AnnotatorFile(str(out), "bob", tasks.read(pair_file))


def test_command_line_errors_are_one_line(pair_file, label_file, tmp_path):
    assert_one_line_error(run_module("annotate", f"--tasks={tmp_path}/missing.jsonl", f"--out={tmp_path}/o",
                                     "--annotator=alice"), "missing.jsonl does not exist")
    mixed = _write(tmp_path / "mixed.jsonl", [PAIRS[0], {"id": "t", "text": "x"}])
    assert_one_line_error(run_module("annotate", f"--tasks={mixed}", f"--out={tmp_path}/o", "--annotator=alice"),
                          "mixed.jsonl:2 is a label task but line 1 is a preference task")
    assert_one_line_error(run_module("annotate", f"--tasks={pair_file}", f"--out={tmp_path}/o", "--annotator=../x"),
                          "--annotator='../x' must be")
    assert_one_line_error(run_module("annotate", f"--tasks={label_file}", f"--out={tmp_path}/o", "--annotator=bob",
                                     "--labels=good,bad"), "--labels=good,bad differs from the label set")
    (tmp_path / "file").write_text("")
    assert_one_line_error(run_module("annotate", f"--tasks={label_file}", f"--out={tmp_path}/file", "--annotator=bob"),
                          f"--out={tmp_path}/file is a file")
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes('{"id": 1, "text": "caf\u00e9"}\n'.encode("latin-1"))
    assert_one_line_error(run_module("annotate", f"--tasks={latin}", f"--out={tmp_path}/o", "--annotator=bob",
                                     "--labels=x,y"), "latin1.jsonl is not UTF-8 text")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(run_module("annotate", f"--tasks={label_file}", f"--out={tmp_path}/o",
                                         "--annotator=bob", f"--port={port}"), f"--port={port}", "pick another port")
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_the_command_serves_the_page_and_records_judgments(label_file, tmp_path):
    from inference.serve.testing import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LMLAB_DEBUG"} | {"PYTHONPATH": REPO}
    server = subprocess.Popen([sys.executable, "-m", "annotate", f"--tasks={label_file}", f"--out={tmp_path}/out",
                               "--annotator=dana", f"--port={port}"], cwd=REPO, env=env, stderr=subprocess.PIPE,
                              text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                with urllib.request.urlopen(url + "/api/state", timeout=2) as response:
                    state = json.load(response)
                break
            except OSError:
                assert time.monotonic() < deadline, "python -m annotate did not answer within 60 s"
                time.sleep(0.1)
        assert (state["annotator"], state["item"]["id"], state["total"]) == ("dana", "t0", 6)
        with urllib.request.urlopen(url + "/", timeout=10) as response:
            assert b"/static/annotate.js" in response.read()
        request = urllib.request.Request(url + "/api/label", data=json.dumps({"id": "t0", "choice": "neutral"}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.load(response)["item"]["id"] == "t1"
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert [(x["id"], x["label"]) for x in _lines(tmp_path / "out" / "dana.jsonl")] == [("t0", "neutral")]
    assert "6 label tasks, 0 judged by dana" in server.stderr.read()


def test_shuffled_sides_show_some_pairs_swapped_and_record_the_task_files_a_and_b(tmp_path):
    pairs = [{"id": i, "prompt": f"Q{i}", "a": f" first {i}", "b": f" second {i}"} for i in range(24)]
    task_path = _write(tmp_path / "pairs.jsonl", pairs)
    task_set = tasks.read(task_path)
    layouts = {}
    for name in ("alice", "bob"):
        client = TestClient(app_lib.create_app(task_set, store.AnnotatorFile(str(tmp_path / "out"), name, task_set),
                                               shuffle_sides=True))
        with client:
            shown_left = []
            for _ in pairs:
                item = client.get("/api/state").json()["item"]
                shown_left.append(item["a"])
                state = client.post("/api/label", json={"id": item["id"], "choice": "a"}).json()  # always the left
                assert state["last"] == {"id": item["id"], "choice": "a"}  # as shown, not as recorded
        lines = _lines(tmp_path / "out" / f"{name}.jsonl")
        # the file records the response that was on the left as chosen, in the task file's terms
        assert [line["chosen"] for line in lines] == shown_left
        assert [line["choice"] for line in lines] == ["a" if left.startswith(" first") else "b" for left in shown_left]
        layouts[name] = [left.startswith(" second") for left in shown_left]
        assert layouts[name] == [app_lib.swapped_sides(name, str(i)) for i in range(24)]
    # both layouts occur for each annotator, and the two annotators' layouts differ (a fair coin per pair
    # and annotator: each of these fails with probability 2^-23)
    assert all(0 < sum(layout) < 24 for layout in layouts.values()) and layouts["alice"] != layouts["bob"]
