"""What the runtime tells monitoring: Prometheus metrics, ``/healthz`` and ``/readyz`` over HTTP.

Owns: the metric families (polls, messages by outcome, delivery and poll latencies, flow health and last success,
the tunnel as a flow last saw it) in a private registry, and a small threaded HTTP server for them:
``/metrics`` (Prometheus text format), ``/healthz`` (200 while the process runs), ``/readyz`` (200 when the store
answers and every flow is healthy, else 503 with the unhealthy flows as JSON).
Must not: decide health (the engine does) or touch the store itself (``ready`` is the engine's callable).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from postbridge.addresses import HostPort
from postbridge.errors import ConfigurationError

log = logging.getLogger("postbridge.runtime.metrics")

Ready = Callable[[], tuple[bool, dict[str, Any]]]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class Metrics:
    """The runtime's metric families; every method is cheap and thread-safe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.polls = Counter("postbridge_polls", "Mailbox polls by result.", ["flow", "result"], registry=r)
        self.messages = Counter(
            "postbridge_messages",
            "Messages by outcome (delivered, duplicate, refused).",
            ["flow", "outcome"],
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "postbridge_delivery_seconds", "Time the target took to accept a message.", ["flow"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )  # fmt: skip
        self.poll_seconds = Histogram("postbridge_poll_seconds", "Duration of a draining poll.", ["flow"], registry=r)
        self.healthy = Gauge(
            "postbridge_flow_healthy", "1 when the flow polled successfully lately.", ["flow"], registry=r
        )
        self.last_success = Gauge(
            "postbridge_flow_last_success_timestamp_seconds", "Time of the last successful poll.", ["flow"], registry=r
        )
        self.tunnel_up = Gauge(
            "postbridge_flow_tunnel_up",
            "1 when the flow's last connection through the hub worked.",
            ["flow"],
            registry=r,
        )

    def poll(self, flow: str, *, ok: bool, seconds: float) -> None:
        self.polls.labels(flow, "ok" if ok else "failed").inc()
        if ok and seconds:
            self.poll_seconds.labels(flow).observe(seconds)

    def delivered(self, flow: str, seconds: float, *, duplicate: bool = False) -> None:
        self.messages.labels(flow, "duplicate" if duplicate else "delivered").inc()
        self.delivery_seconds.labels(flow).observe(seconds)

    def message(self, flow: str, outcome: str) -> None:
        self.messages.labels(flow, outcome).inc()

    def tunnel(self, flow: str, *, up: bool) -> None:
        self.tunnel_up.labels(flow).set(1 if up else 0)

    def health(self, flow: str, *, healthy: bool, last_success: float | None) -> None:
        self.healthy.labels(flow).set(1 if healthy else 0)
        if last_success is not None:
            self.last_success.labels(flow).set(last_success)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``listen`` in a daemon thread. Raises ConfigurationError when the
    address cannot be bound."""

    def __init__(self, metrics: Metrics, listen: HostPort, ready: Ready) -> None:
        prometheus = make_wsgi_app(metrics.registry)

        def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                return prometheus(environ, start_response)  # type: ignore[no-any-return]
            if path == "/healthz":
                return _json(start_response, 200, {"status": "ok"})
            if path == "/readyz":
                ok, detail = ready()
                return _json(start_response, 200 if ok else 503, {"status": "ready" if ok else "not ready", **detail})
            return _json(start_response, 404, {"error": "not found", "paths": ["/metrics", "/healthz", "/readyz"]})

        try:
            self._server = make_server(
                listen.host, listen.port, app, server_class=_ThreadingServer, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen for metrics on {listen}: {exc.strerror or exc}",
                hint='choose a free address for [runtime] metrics, or "" to turn the endpoint off',
            ) from exc
        self.address = HostPort(listen.host, int(self._server.server_address[1]))
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _json(start_response: StartResponse, status: int, body: dict[str, Any]) -> list[bytes]:
    reasons = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}
    data = json.dumps(body).encode()
    start_response(
        f"{status} {reasons[status]}", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]
