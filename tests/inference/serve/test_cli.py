"""`python -m inference.serve`: serves a checkpoint over HTTP on loopback; bad flags are one line."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import openai

from inference.serve.testing import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _env():
    return {**os.environ, "PYTHONPATH": REPO}


def test_the_cli_serves_a_hugging_face_directory_and_stops_on_sigint(tiny_hf_dir):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "inference.serve", f"--checkpoint={tiny_hf_dir}",
                                f"--port={port}", "--model_name=tiny", "--chat_template=chatml", "--num_slots=2",
                                "--max_len=128"],
                               cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, process.stderr.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err[-3000:]
    assert f"serving on http://127.0.0.1:{port}" in err and "Traceback" not in err


def test_bad_flags_are_one_error_line(tmp_path):
    for args, says in (([f"--checkpoint={tmp_path / 'missing'}"], "not a directory"),
                       ([f"--checkpoint={tmp_path}", "--num_slots=0"], "--num_slots=0 must be > 0")):
        result = subprocess.run([sys.executable, "-m", "inference.serve", *args], cwd=REPO, env=_env(),
                                capture_output=True, text=True, timeout=300, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], \
            result.stderr[-2000:]
