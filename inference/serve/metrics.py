"""Prometheus text exposition (format 0.0.4), written by hand: counters, gauges, histograms.

    metrics = Metrics()
    metrics.requests.inc(status="200")
    metrics.token(0.05, first=True)          # a time to first token
    text = metrics.render(queue=3, running=4)
"""

from __future__ import annotations

import bisect
import collections
import threading
import time

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RATE_WINDOW_S = 10.0  # tokens/s is measured over this trailing window


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Counter:
    def __init__(self, name: str, help: str):  # noqa: A002
        self.name, self.help, self.values, self._lock = name, help, collections.Counter(), threading.Lock()

    def inc(self, amount: float = 1, **labels: str) -> None:
        with self._lock:
            self.values[tuple(sorted(labels.items()))] += amount

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        values = dict(self.values) or {(): 0}
        out += [f"{self.name}{_labels(dict(k))} {v}" for k, v in sorted(values.items())]
        return out


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):  # noqa: A002
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum, self.count, self._lock = 0.0, 0, threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.count += 1

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{self.name}_bucket{{le="{le}"}} {cumulative}')
        return [*out, f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]


class Metrics:
    """What /metrics reports; the engine thread and the handlers update it."""

    def __init__(self):
        self.requests = Counter("lmlab_requests_total", "HTTP requests answered, by endpoint and status code.")
        self.tokens = Counter("lmlab_generation_tokens_total", "Tokens generated.")
        self.prompt_tokens = Counter("lmlab_prompt_tokens_total", "Prompt tokens prefilled.")
        self.cancelled = Counter("lmlab_requests_cancelled_total",
                                 "Engine requests stopped early (client gone, timeout or stop string).")
        self.ttft = Histogram("lmlab_time_to_first_token_seconds", "Seconds from submission to the first token.",
                              TTFT_BUCKETS)
        self.itl = Histogram("lmlab_inter_token_latency_seconds", "Seconds between a request's tokens.", ITL_BUCKETS)
        self.steps = Counter("lmlab_engine_steps_total", "Engine decode steps.")
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def step(self, tokens: int, now: float) -> None:
        self.steps.inc()
        self.tokens.inc(tokens)
        with self._lock:
            self._recent.append((now, tokens))

    def token(self, seconds: float, *, first: bool) -> None:
        (self.ttft if first else self.itl).observe(seconds)

    def tokens_per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def render(self, *, queue: int, running: int, slots: int) -> str:
        gauges = [("lmlab_queue_length", "Requests waiting for a slot.", queue),
                  ("lmlab_running_requests", "Requests decoding in a slot.", running),
                  ("lmlab_slots", "Decode slots (continuous batching width).", slots),
                  ("lmlab_generation_tokens_per_second", f"Tokens generated per second over the last "
                   f"{RATE_WINDOW_S:g} s.", self.tokens_per_second())]
        lines = []
        for name, help_, value in gauges:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {value}"]
        for metric in (self.requests, self.tokens, self.prompt_tokens, self.cancelled, self.steps, self.ttft,
                       self.itl):
            lines += metric.lines()
        return "\n".join(lines) + "\n"
