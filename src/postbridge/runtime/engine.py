"""The runtime: every flow of a flows file, polled on schedule under a lease, into its target, forever.

* A **scheduler** thread ticks every :data:`TICK` seconds. A poll flow is *due* when the store says its last poll
  (by any worker) is ``interval`` old; the worker that wins the flow's lease polls it in a thread until the mailbox
  is drained, records the poll and releases the lease. An IDLE flow keeps its lease while it watches. Leases are
  renewed every third of their length; a worker that loses one (it stalled past the lease) stops handing messages
  on at once (:class:`LeaseLost`), so one mailbox is never polled by two workers.
* A **flow runner** (:mod:`postbridge.runtime.runner`) hands each message to the target and keeps the log; a
  refusal is retried with exponential backoff (:class:`FlowState`); a permanent one, or the last attempt, quarantines.
* **Health**: a flow with no successful poll for ``stale_after`` is unhealthy — logged at error level on the
  change, in the metrics, and in ``postbridge flows status``' exit code.

Must not: parse the flows file (runtime/config.py), know a target's kind (runtime/targets.py), or serve HTTP
(runtime/metrics.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from postbridge.errors import PostbridgeError
from postbridge.mail.poller import (
    PollReport,
)
from postbridge.mail.settings import Proxy
from postbridge.mail.transport import MailConnectError
from postbridge.runtime.config import FlowConfig, RuntimeConfig
from postbridge.runtime.metrics import Metrics
from postbridge.runtime.runner import FlowRunner, LeaseLost
from postbridge.runtime.store import FlowHealth, MessageStatus, RuntimeStore
from postbridge.runtime.targets import Target

log = logging.getLogger("postbridge.runtime")

TICK = 0.5
"""Seconds between two looks of the scheduler at due polls, leases and health."""


def default_worker() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class _Running:
    runner: FlowRunner
    thread: threading.Thread


class Runtime:
    """Runs the flows of ``config`` with ``store`` until :meth:`stop`; ``targets`` by flow name."""

    def __init__(
        self,
        config: RuntimeConfig,
        store: RuntimeStore,
        targets: dict[str, Target],
        metrics: Metrics,
        *,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.targets = targets
        self.metrics = metrics
        self.owner = owner or config.worker or default_worker()
        self.clock = clock
        self.started = clock()
        self._stop = threading.Event()
        self._running: dict[str, _Running] = {}
        self._healthy: dict[str, bool] = {}
        self._renewed: dict[str, float] = {}  # flow -> when this worker last took or renewed its lease
        self._lock = threading.Lock()
        self.flows = {flow.name: flow for flow in config.flows if flow.enabled}

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Schedule until :meth:`stop`; then let running polls finish their current message and release."""
        log.info("runtime %s: %d flow(s), state %s", self.owner, len(self.flows), _safe_url(self.config.state))
        try:
            while not self._stop.is_set():
                self.tick()
                self._stop.wait(TICK)
        finally:
            self._shutdown()

    def stop(self) -> None:
        self._stop.set()

    def _shutdown(self) -> None:
        with self._lock:
            running = list(self._running.values())
        for item in running:
            item.runner.halt()
        for item in running:
            item.thread.join(timeout=30)
        for name in list(self.flows):
            with contextlib.suppress(PostbridgeError):
                self.store.release_lease(name, self.owner)

    def run_once(self, *, wait: float | None = None) -> dict[str, str]:
        """Poll every flow once until drained (waiting up to ``wait`` s, default a lease's length, for a lease another
        worker holds). Returns flow name -> "" when it worked, else the error."""
        results: dict[str, str] = {}
        lease = self.config.lease_seconds
        for name, flow in self.flows.items():
            deadline = time.monotonic() + (lease + 5 if wait is None else wait)
            while not self.store.acquire_lease(name, self.owner, lease):
                if time.monotonic() > deadline:
                    results[name] = "its lease is held by another worker"
                    break
                time.sleep(TICK)
            else:
                runner = FlowRunner(flow, self.store, self.targets[name], self.metrics, self.owner)
                with self._renewing(runner):
                    try:
                        report = runner.poll()
                    except LeaseLost:
                        results[name] = "lease lost to another worker"
                        continue
                    except PostbridgeError as exc:
                        self.store.record_poll(name, self.owner, ok=False, at=self.clock(), error=exc.message)
                        results[name] = exc.message + (f" ({exc.hint})" if exc.hint else "")
                    else:
                        self.store.record_poll(
                            name, self.owner, ok=True, at=self.clock(), seen=report.seen,
                            delivered=report.delivered, failed=report.failed,
                        )  # fmt: skip
                        results[name] = "; ".join(report.errors)
                    finally:
                        self.store.release_lease(name, self.owner)
        return results

    @contextlib.contextmanager
    def _renewing(self, runner: FlowRunner) -> Iterator[None]:
        """Renew the runner's lease every third of its length while the block runs."""
        done = threading.Event()
        lease = self.config.lease_seconds

        def renew() -> None:
            while not done.wait(lease / 3):
                if not self.store.acquire_lease(runner.flow.name, self.owner, lease):
                    runner.lease_lost.set()
                    return

        thread = threading.Thread(target=renew, name=f"lease-{runner.flow.name}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(timeout=5)

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """For ``/readyz``: the store answers and every flow is healthy."""
        try:
            self.store.health()
        except PostbridgeError as exc:
            return False, {"store": exc.message}
        unhealthy = self.unhealthy()
        return not unhealthy, {"flows": len(self.flows), "unhealthy": unhealthy}

    # -- the scheduler --------------------------------------------------------------------------------------------

    def tick(self) -> None:
        """One look: renew held leases, start due polls and IDLE watchers, judge health."""
        now = self.clock()
        lease = self.config.lease_seconds
        with self._lock:
            running = dict(self._running)
        for name, item in running.items():
            if now - self._renewed.get(name, 0.0) < lease / 3:
                continue  # renewed lately: a third of the lease is the margin
            if self.store.acquire_lease(name, self.owner, lease, now=now):
                self._renewed[name] = now
            else:
                log.error("flow %s: lease lost to another worker; stopping it here", name)
                item.runner.halt(lease_lost=True)
        health = {h.flow: h for h in self.store.health()}
        for name, flow in self.flows.items():
            if name in running:
                continue
            last = health.get(name)
            last_poll = last.last_poll if last is not None else None
            if flow.mode == "poll" and last_poll is not None and now - last_poll < flow.interval:
                continue
            if not self.store.acquire_lease(name, self.owner, lease, now=now):
                continue  # another worker has it
            if flow.mode == "poll" and not self._still_due(flow, now):
                self.store.release_lease(name, self.owner)  # another worker polled it since our look
                continue
            self._renewed[name] = now
            self._start(flow)
        self._judge_health(health, now)

    def _still_due(self, flow: FlowConfig, now: float) -> bool:
        fresh = self.store.health(flow.name)
        last_poll = fresh[0].last_poll if fresh else None
        return last_poll is None or now - last_poll >= flow.interval

    def _start(self, flow: FlowConfig) -> None:
        runner = FlowRunner(flow, self.store, self.targets[flow.name], self.metrics, self.owner)
        target = self._watch if flow.mode == "idle" else self._poll
        thread = threading.Thread(target=target, args=(runner,), name=f"flow-{flow.name}", daemon=True)
        with self._lock:
            self._running[flow.name] = _Running(runner, thread)
        thread.start()

    def _poll(self, runner: FlowRunner) -> None:
        name = runner.flow.name
        started = time.perf_counter()
        try:
            report = runner.poll()
        except LeaseLost:
            self._finished(runner, ok=False, error="lease lost", release=False)
        except PostbridgeError as exc:
            self._poll_failed(runner, exc)
        except Exception as exc:  # a bug must not kill the scheduler: log it, count a failed poll
            log.exception("flow %s: unexpected failure", name)
            self._finished(runner, ok=False, error=f"{type(exc).__name__}: {exc}")
        else:
            self.metrics.poll(name, ok=True, seconds=time.perf_counter() - started)
            self._finished(runner, ok=True, report=report)

    def _watch(self, runner: FlowRunner) -> None:
        def on_report(report: PollReport) -> None:
            self.store.record_poll(
                runner.flow.name, self.owner, ok=True, at=self.clock(), seen=report.seen,
                delivered=report.delivered, failed=report.failed,
            )  # fmt: skip
            self.metrics.poll(runner.flow.name, ok=True, seconds=0.0)

        try:
            runner.watch(on_report)
        except LeaseLost:
            pass
        finally:
            self._finished(runner, ok=True, record=False, release=not runner.lease_lost.is_set())

    def _poll_failed(self, runner: FlowRunner, exc: PostbridgeError) -> None:
        name = runner.flow.name
        log.warning("flow %s: poll failed: %s%s", name, exc.message, f" ({exc.hint})" if exc.hint else "")
        self.metrics.poll(name, ok=False, seconds=0.0)
        if runner.flow.channel.proxy is Proxy.ON_PREMISE:
            self.metrics.tunnel(name, up=not isinstance(exc, MailConnectError))
        self._finished(runner, ok=False, error=exc.message)

    def _finished(
        self,
        runner: FlowRunner,
        *,
        ok: bool,
        error: str = "",
        report: PollReport | None = None,
        record: bool = True,
        release: bool = True,
    ) -> None:
        name = runner.flow.name
        try:
            if record:
                self.store.record_poll(
                    name, self.owner, ok=ok, at=self.clock(), error=error, seen=report.seen if report else 0,
                    delivered=report.delivered if report else 0, failed=report.failed if report else 0,
                )  # fmt: skip
            if ok and runner.flow.channel.proxy is Proxy.ON_PREMISE:
                self.metrics.tunnel(name, up=True)
            if release:
                self.store.release_lease(name, self.owner)
        except PostbridgeError as exc:
            log.error("flow %s: could not record the poll: %s", name, exc.message)
        finally:
            with self._lock:
                self._running.pop(name, None)

    # -- health ---------------------------------------------------------------------------------------------------

    def _judge_health(self, health: dict[str, FlowHealth], now: float) -> None:
        for name, flow in self.flows.items():
            entry = health.get(name)
            last_success = entry.last_success if entry else None
            since = last_success if last_success is not None else self.started
            healthy = now - since <= flow.stale_after
            if self._healthy.get(name, True) and not healthy:
                error = (entry.last_error if entry else "") or "no poll finished"
                log.error(
                    "flow %s is UNHEALTHY: no successful poll for %.0f s (stale_after %g s); last error: %s",
                    name, now - since, flow.stale_after, error,
                )  # fmt: skip
            elif not self._healthy.get(name, True) and healthy:
                log.info("flow %s is healthy again", name)
            self._healthy[name] = healthy
            self.metrics.health(name, healthy=healthy, last_success=last_success)

    def unhealthy(self) -> list[str]:
        """Flows judged unhealthy at the last tick."""
        return [name for name, healthy in self._healthy.items() if not healthy]


def _safe_url(url: str) -> str:
    """The state URL without a password."""
    if "@" not in url or "://" not in url:
        return url or "sqlite"
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}@{host}"


@contextlib.contextmanager
def running(runtime: Runtime) -> Iterator[threading.Thread]:
    """Run ``runtime`` in a thread for the duration of the block (tests, the benchmark)."""
    thread = threading.Thread(target=runtime.run, name="runtime", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        runtime.stop()
        thread.join(timeout=60)


def flow_health_rows(config: RuntimeConfig, store: RuntimeStore, now: float) -> list[dict[str, Any]]:
    """Per flow of ``config``: health from the shared store (as ``postbridge flows status`` shows it). A flow that
    never polled successfully, or not within ``stale_after``, is unhealthy; a disabled one is not judged."""
    health = {entry.flow: entry for entry in store.health()}
    rows: list[dict[str, Any]] = []
    for flow in config.flows:
        entry = health.get(flow.name)
        counts = store.counts(flow.name)
        last_success = entry.last_success if entry else None
        healthy = not flow.enabled or (last_success is not None and now - last_success <= flow.stale_after)
        rows.append(
            {
                "flow": flow.name,
                "enabled": flow.enabled,
                "healthy": healthy,
                "owner": entry.owner if entry else "",
                "last_poll": entry.last_poll if entry else None,
                "last_success": last_success,
                "last_error": entry.last_error if entry else "",
                "consecutive_failures": entry.consecutive_failures if entry else 0,
                "stale_after": flow.stale_after,
                **{status.value.replace("-", "_"): counts.get(status, 0) for status in MessageStatus},
            }
        )
    return rows
