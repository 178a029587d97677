"""The front door's Prometheus metrics, per deployment, served at ``GET /metrics``.

Every name is listed in docs/metrics.md. Each ingress replica keeps its own registry
(one per process; Prometheus sums across replicas). The ``deployment`` label only ever
takes the name of a deployment the door serves (or ``unknown``), never raw client input.

    metrics = FrontDoorMetrics()
    metrics.answered("sums", 200, final_event)    # thinking tokens, waits, forced end
    metrics.first_token("sums", seconds)
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["FrontDoorMetrics"]

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
THINKING_BUCKETS = (0, 16, 64, 256, 1024, 4096, 16384, 32768, 65536)


class FrontDoorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        d = ["deployment"]
        self.requests = Counter(
            "thinkforge_frontdoor_requests_total",
            "Front-door requests answered, by deployment and HTTP status code",
            [*d, "status"], registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "thinkforge_frontdoor_time_to_first_token_seconds",
            "From the request to the first generated token (streams) or the answer",
            d, buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "thinkforge_frontdoor_time_per_output_token_seconds",
            "Decode time per completion token after the first",
            d, buckets=TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.thinking = Histogram(
            "thinkforge_frontdoor_thinking_tokens",
            "Thinking tokens per answered request",
            d, buckets=THINKING_BUCKETS, registry=r,
        )  # fmt: skip
        self.waits = Counter(
            "thinkforge_frontdoor_waits_inserted_total",
            "Wait strings budget forcing inserted", d, registry=r,
        )  # fmt: skip
        self.forced_ends = Counter(
            "thinkforge_frontdoor_forced_ends_total",
            "Answers whose thinking was ended by the max_tokens budget", d, registry=r,
        )  # fmt: skip
        self.ongoing = Gauge(
            "thinkforge_frontdoor_ongoing_requests",
            "Requests in the front door waiting for or streaming from a deployment",
            d, registry=r,
        )  # fmt: skip
        self.batch = Gauge(
            "thinkforge_replica_batch_occupancy",
            "Sequences decoding in the answering replica's batch, as of its last answer",
            d, registry=r,
        )  # fmt: skip
        self.queued = Gauge(
            "thinkforge_replica_queue_depth",
            "Requests waiting for a batch slot in the answering replica, as of its last answer",
            d, registry=r,
        )  # fmt: skip

    def status(self, deployment: str, status: int) -> None:
        self.requests.labels(deployment, str(status)).inc()

    def answered(self, deployment: str, final: dict[str, Any], *, started: float,
                 first_token_at: float | None, finished: float) -> None:  # fmt: skip
        """One answer: its final event (thinking summary, tokens) and its timing."""
        thinking = final.get("thinking") or {}
        self.thinking.labels(deployment).observe(int(thinking.get("tokens", 0)))
        self.waits.labels(deployment).inc(int(thinking.get("waits_inserted", 0)))
        if thinking.get("forced_end"):
            self.forced_ends.labels(deployment).inc()
        first = finished if first_token_at is None else first_token_at
        self.ttft.labels(deployment).observe(max(0.0, first - started))
        completion = int(final.get("completion_tokens", 0))
        if completion > 1:
            self.tpot.labels(deployment).observe(max(0.0, finished - first) / (completion - 1))
        replica = final.get("replica") or {}
        if "batch" in replica:
            self.batch.labels(deployment).set(replica["batch"])
        if "queued" in replica:
            self.queued.labels(deployment).set(replica["queued"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
