"""Prometheus text exposition (format 0.0.4) with small hand-rolled Counter/Gauge/Histogram.

prometheus_client would be one more dependency for ~100 lines of formatting. Metrics are updated
from the event loop thread only, so no locking is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from crosschip.serve.engine_api import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "crosschip_"

LabelKey = tuple[tuple[str, str], ...]

# Seconds; first-token latency is dominated by queueing + prefill, inter-token by one decode step.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(key: LabelKey, extra: Iterable[tuple[str, str]] = ()) -> str:
    pairs = [*key, *extra]
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str) -> None:
        self.name = PREFIX + name
        self.help = help_text

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError

    def render(self) -> list[str]:
        return self.header() + self.samples()


class Counter(_Metric):
    """A monotonically increasing count per label set; exposed as `<name>_total`."""

    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self._values: dict[LabelKey, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = tuple(sorted(labels.items()))
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def samples(self) -> list[str]:
        values = self._values or {(): 0.0}
        return [f"{self.name}_total{_labels(k)} {_number(v)}" for k, v in sorted(values.items())]


class Gauge(_Metric):
    """A value read at scrape time from `read` (engine state is the source of truth, not a copy)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        super().__init__(name, help_text)
        self._read = read

    def samples(self) -> list[str]:
        return [f"{self.name} {_number(self._read())}"]


class ReadCounter(Gauge):
    """A monotonic total read at scrape time (e.g. seconds the engine spent in one phase since start)."""

    kind = "counter"


def parse_text(text: str) -> dict[str, float]:
    """The sample lines of a /metrics page as {name (with its labels): value}, as tests and benchmarks read it."""
    return {name: float(value) for name, value in
            (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}


class Histogram(_Metric):
    """Cumulative buckets + sum + count, without labels."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help_text)
        if list(buckets) != sorted(buckets):
            raise ValueError("histogram buckets must be increasing")
        self._bounds = [*buckets, math.inf]
        self._counts = [0] * len(self._bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self._bounds):
            if value <= bound:
                self._counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def samples(self) -> list[str]:
        lines, cumulative = [], 0
        for bound, n in zip(self._bounds, self._counts, strict=True):
            cumulative += n
            lines.append(f"{self.name}_bucket{_labels((), [('le', _number(bound))])} {cumulative}")
        lines.append(f"{self.name}_sum {_number(self.sum)}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


class ServerMetrics:
    """Everything /metrics exposes; the serving layer and the HTTP middleware update it."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.in_flight = 0
        self._stats = stats
        self._snapshot: EngineStats | None = None
        self.requests = Counter("requests", "HTTP API requests finished, by status code.")
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = Counter("generation_tokens", "Tokens generated.")
        self.finished = Counter("request_finished", "Generation sequences finished, by reason.")
        self.ttft = Histogram(
            "time_to_first_token_seconds", "Time from request arrival to first token.", TTFT_BUCKETS
        )
        self.itl = Histogram(
            "inter_token_latency_seconds", "Time between consecutive output tokens.", ITL_BUCKETS
        )
        self.e2e = Histogram("request_latency_seconds", "Time from arrival to the last token.", E2E_BUCKETS)
        self._gauges = [
            Gauge(
                "queue_depth",
                "Requests admitted and waiting for a batch slot.",
                lambda: self._snap().queue_depth,
            ),
            Gauge("running_batch_size", "Sequences in the running batch.", lambda: self._snap().running),
            Gauge(
                "kv_cache_used_tokens",
                "KV cache positions held by live sequences.",
                lambda: self._snap().kv_used_tokens,
            ),
            Gauge(
                "kv_cache_capacity_tokens",
                "KV cache budget in token positions.",
                lambda: self._snap().kv_capacity_tokens,
            ),
            Gauge(
                "kv_cache_used_blocks",
                "Paged KV cache blocks held by live sequences (freed on finish or abort).",
                lambda: self._snap().kv_blocks_used,
            ),
            Gauge("kv_cache_total_blocks", "Blocks in the paged KV cache.", lambda: self._snap().kv_blocks_total),
            ReadCounter("engine_steps_total", "Engine steps (one forward each) since start.",
                        lambda: self._snap().steps),
            ReadCounter("engine_schedule_seconds_total",
                        "Host time scheduling steps and building their batches (before each forward).",
                        lambda: self._snap().schedule_s),
            ReadCounter("engine_forward_seconds_total", "Time in the model forward of each step.",
                        lambda: self._snap().forward_s),
            ReadCounter("engine_sample_seconds_total",
                        "Time sampling each step's tokens and handing them to their requests (one host sync).",
                        lambda: self._snap().sample_s),
            ReadCounter("prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
                        lambda: self._snap().prefix_queries),
            ReadCounter("prefix_cache_hits_total", "Prompt tokens found in the prefix cache (K/V shared).",
                        lambda: self._snap().prefix_hits),
            Gauge("num_preemptions", "Sequences preempted for KV blocks since start (recomputed later).",
                  lambda: self._snap().preemptions),
            Gauge("kv_cache_block_size", "Token positions per KV cache block.", lambda: self._snap().kv_block_size),
            Gauge("max_batch", "Configured running batch limit.", lambda: self._snap().max_batch),
            Gauge("max_queue", "Configured admission queue limit.", lambda: self._snap().max_queue),
            Gauge("requests_in_flight", "HTTP API requests being handled now.", lambda: self.in_flight),
        ]

    def _snap(self) -> EngineStats:
        if self._snapshot is None:
            self._snapshot = self._stats()
        return self._snapshot

    def render(self) -> str:
        self._snapshot = None  # one consistent engine snapshot per scrape
        metrics: list[_Metric] = [
            self.requests,
            self.prompt_tokens,
            self.generation_tokens,
            self.finished,
            self.ttft,
            self.itl,
            self.e2e,
            *self._gauges,
        ]
        return "\n".join(line for m in metrics for line in m.render()) + "\n"
