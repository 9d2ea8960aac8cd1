"""Prometheus metrics: counters and histograms of jobs, gauges of the queue, on a local port.

Off unless ``metrics_port`` is set. Uses its own registry (not the
process-global one) and ``prometheus_client``'s HTTP server thread, which
only reads: gauges are read from the scheduler at scrape time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from ..result import Result

log = logging.getLogger(__name__)

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(
        self, running: Callable[[], float], queued: Callable[[], float], sessions_open: Callable[[], float]
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter("runnerd_jobs", "Jobs finished, by outcome and reason", ["outcome", "reason"], registry=r)
        self.latency = Histogram("runnerd_job_latency_seconds", "Accepted to result", buckets=_BUCKETS, registry=r)
        self.run_time = Histogram("runnerd_job_run_seconds", "Wall clock in the cage", buckets=_BUCKETS, registry=r)
        self.cpu = Histogram("runnerd_job_cpu_seconds", "CPU time of the cage", buckets=_BUCKETS, registry=r)
        self.errors = Counter(
            "runnerd_request_errors", "Requests answered with an error, by code", ["code"], registry=r
        )
        self.reloads = Counter("runnerd_reloads", "SIGHUP reloads, by result", ["result"], registry=r)
        Gauge("runnerd_jobs_running", "Jobs in a cage now", registry=r).set_function(running)
        Gauge("runnerd_jobs_queued", "Jobs waiting for a slot", registry=r).set_function(queued)
        Gauge("runnerd_sessions_open", "Sessions open now", registry=r).set_function(sessions_open)
        self.sessions_opened = Counter("runnerd_sessions_opened", "Sessions opened", registry=r)
        self.sessions_ended = Counter(
            "runnerd_sessions_ended", "Sessions ended, by reason (closed is a client's close)", ["reason"], registry=r
        )
        self._server: Any = None  # the WSGI server start_http_server made

    def job_finished(self, result: Result, latency_s: float) -> None:
        reason = result.reason.value if result.reason else "none"
        self.jobs.labels(result.outcome.value, reason).inc()
        self.latency.observe(latency_s)
        if result.usage.wall_s:
            self.run_time.observe(result.usage.wall_s)
            self.cpu.observe(result.usage.cpu_s)

    def serve(self, address: str, port: int) -> None:
        self._server, _ = start_http_server(port, addr=address, registry=self.registry)
        log.info("Prometheus metrics on http://%s:%d/metrics", address, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
