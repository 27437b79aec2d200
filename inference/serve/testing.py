"""Serve an app on a free loopback port from a background thread (tests, notebooks, agents).

    with running_server(create_app(loaded)) as base_url:        # "http://127.0.0.1:PORT"
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="none")
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import uvicorn


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, *, host: str = "127.0.0.1", port: int | None = None,
                   startup_timeout_s: float = 60.0) -> Iterator[str]:
    """Runs `app` with uvicorn in a daemon thread until the block ends; yields its base URL.

    Args:
      app: an ASGI app (`inference.serve.app.create_app`).
      host: the address to bind (loopback by default).
      port: None: a free port.
      startup_timeout_s: the most seconds to wait for GET /health to answer 200.

    Raises:
      RuntimeError: the server did not become healthy in time.
    """
    port = port or free_port(host)
    # log_config=None: an embedded server must not reconfigure the host process's logging (uvicorn's
    # dictConfig closes every existing handler, pytest's capture handlers and a notebook's included).
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                           log_config=None))
    thread = threading.Thread(target=server.run, name="lmlab-uvicorn", daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + startup_timeout_s
    try:
        while True:
            if not thread.is_alive():
                raise RuntimeError(f"the server on {url} stopped while starting; see its log")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server on {url} was not healthy after {startup_timeout_s:g} s")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
