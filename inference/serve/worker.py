"""One thread owns the engine; asyncio handlers talk to it through a command queue.

    loop = EngineLoop(engine, max_queue=64, metrics=metrics)
    events = asyncio.Queue()
    ticket = loop.submit(Request(ids, max_new_tokens=16), events, index=0)  # QueueFull past capacity
    index, event = await events.get()                       # Event(token, logprobs, done, error)
    loop.cancel(ticket)                                     # a client went away: frees the slot

The engine is never touched outside its thread: `submit` and `cancel` put commands on a
queue that the thread drains between steps (blocking on it while idle), and each token
goes back to the handler's `asyncio.Queue` through `call_soon_threadsafe`. Requests waiting
and running together are bounded by `num_slots + max_queue`; past it `submit` raises
`QueueFull` (the server answers 429).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time

from inference.engine import Engine, Request
from inference.serve.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine holds as many requests as it may queue."""


@dataclasses.dataclass
class Event:
    token: int
    logprobs: tuple[float, list[tuple[int, float]]] | None
    done: bool
    error: str | None = None


class Ticket:
    """The asyncio side of one engine request: its events go to `queue` as (index, Event)."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int):
        self.request, self.loop, self.queue, self.index = request, loop, events, index
        self.request_id: int | None = None  # set on the engine thread
        self.cancelled = False
        self.finished = False
        self.created = time.monotonic()
        self.last = None  # time of the last token (engine thread)

    def put(self, event: Event) -> None:  # engine thread
        if event.done:
            self.finished = True
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, event))
        except RuntimeError:  # the event loop has closed (server shutting down)
            pass


class EngineLoop:
    """Runs `engine` on a daemon thread: admission, decode steps, cancellation, metrics."""

    def __init__(self, engine: Engine, *, max_queue: int, metrics: Metrics):
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self.capacity = engine.num_slots + max_queue
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._tickets: dict[int, Ticket] = {}
        self._lock = threading.Lock()
        self._outstanding = 0  # submitted and not finished (guarded by _lock)
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._run, name="lmlab-engine", daemon=True)
        self._stop = threading.Event()
        self._thread.start()

    # ------------------------------------------------------------ any thread

    def submit(self, request: Request, events: asyncio.Queue, index: int = 0) -> Ticket:
        """Queues a request (call from the event loop); raises QueueFull when at capacity."""
        with self._lock:
            if self._outstanding >= self.capacity:
                raise QueueFull(f"{self._outstanding} requests are queued or running, the server's limit")
            self._outstanding += 1
        ticket = Ticket(request, asyncio.get_running_loop(), events, index)
        self._commands.put(("submit", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stops a request that has not finished; its slot is freed before the next step."""
        if not ticket.finished and not ticket.cancelled:
            ticket.cancelled = True
            self._commands.put(("cancel", ticket))

    @property
    def outstanding(self) -> int:
        return self._outstanding

    @property
    def running(self) -> int:
        return self.engine.num_running

    @property
    def waiting(self) -> int:
        return max(0, self._outstanding - self.engine.num_running)

    def close(self) -> None:
        self._stop.set()
        self._commands.put(("stop", None))
        self._thread.join(timeout=30)

    # ------------------------------------------------------------ engine thread

    def _done(self, ticket: Ticket) -> None:
        with self._lock:
            self._outstanding -= 1
        if ticket.request_id is not None:
            self._tickets.pop(ticket.request_id, None)
            self.engine.results.pop(ticket.request_id, None)
            self.engine.logprobs.pop(ticket.request_id, None)

    def _command(self, kind: str, ticket: Ticket | None) -> None:
        if kind == "submit":
            if ticket.cancelled:
                self._done(ticket)
                self.metrics.cancelled.inc()
                return
            try:
                ticket.request_id = self.engine.submit(ticket.request)
            except ValueError as e:
                self._done(ticket)
                ticket.put(Event(-1, None, True, error=str(e)))
                return
            self._tickets[ticket.request_id] = ticket
        elif kind == "cancel" and ticket.request_id is not None and ticket.request_id in self._tickets:
            self.engine.cancel(ticket.request_id)
            self._done(ticket)
            self.metrics.cancelled.inc()

    def _drain(self, block: bool) -> None:
        try:
            kind, ticket = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            while True:
                self._command(kind, ticket)
                kind, ticket = self._commands.get_nowait()
        except queue.Empty:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.engine.busy)
            if not self.engine.busy:
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a broken engine: fail everyone, report unhealthy
                log.exception("the engine step failed")
                self.failure = f"{type(e).__name__}: {e}"
                for ticket in list(self._tickets.values()):
                    ticket.put(Event(-1, None, True, error="the engine failed; see the server log"))
                    self._done(ticket)
                return
            now = time.monotonic()
            self.metrics.step(len(events), now)
            for request_id, token, done in events:
                ticket = self._tickets.get(request_id)
                if ticket is None:
                    continue
                self.metrics.token(now - (ticket.last or ticket.created), first=ticket.last is None)
                ticket.last = now
                ticket.put(Event(token, self.engine.step_logprobs.get(request_id), done))
                if done:
                    self._done(ticket)
