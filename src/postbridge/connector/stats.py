"""Live counters of a running connector, per virtual host: connections, bytes and recent errors.

The agent reports what happens to every CONNECT (:meth:`ConnectorStats.denied`, :meth:`~ConnectorStats.failed`,
:meth:`~ConnectorStats.connected`, :meth:`~ConnectorStats.disconnected`); the web UI's monitoring page reads
:meth:`ConnectorStats.snapshot`. Byte counts of open connections are read from their bridges when the snapshot is
taken, so they grow while a long IMAP session runs. Directions are named from the private network's view:
``bytes_in`` went from the cloud to the internal host, ``bytes_out`` from the internal host to the cloud.

Counters live in memory only and start at zero with the process. Memory is bounded: at most
:data:`MAX_UNMAPPED` virtual hosts that are not mapped are tracked (a hub asking for random names cannot grow it),
and :data:`RECENT_ERRORS` errors per host and :data:`RECENT_ERRORS_ALL` overall are kept.

Must not: decide anything, do I/O, or be used from another thread than the event loop's (no locks: the agent and
the UI's async routes both run there).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

MAX_UNMAPPED = 100
RECENT_ERRORS = 5
RECENT_ERRORS_ALL = 50


class CountedStream(Protocol):
    """What the stats read from an open connection: its byte counters (a StreamBridge has them)."""

    @property
    def bytes_up(self) -> int: ...  # internal host -> tunnel (out of the private network)

    @property
    def bytes_down(self) -> int: ...  # tunnel -> internal host (into the private network)


@dataclass(frozen=True)
class RecentError:
    """One refused or failed connection: when, to which virtual host, and why."""

    time: float
    virtual: str
    kind: str  # "denied" or "failed"
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"time": _iso(self.time), "virtual": self.virtual, "kind": self.kind, "message": self.message}


@dataclass
class HostStats:
    """Counters of one virtual host."""

    virtual: str
    total: int = 0  # connections opened to the internal host
    denied: int = 0
    failed: int = 0  # allowed, but the internal host could not be reached
    bytes_in_closed: int = 0
    bytes_out_closed: int = 0
    last_used: float | None = None
    active: dict[int, CountedStream] = field(default_factory=dict)
    errors: deque[RecentError] = field(default_factory=lambda: deque(maxlen=RECENT_ERRORS))

    @property
    def bytes_in(self) -> int:
        return self.bytes_in_closed + sum(stream.bytes_down for stream in self.active.values())

    @property
    def bytes_out(self) -> int:
        return self.bytes_out_closed + sum(stream.bytes_up for stream in self.active.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "virtual": self.virtual,
            "active": len(self.active),
            "total": self.total,
            "denied": self.denied,
            "failed": self.failed,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "last_used": _iso(self.last_used) if self.last_used is not None else None,
            "recent_errors": [error.to_json() for error in reversed(self.errors)],
        }


class ConnectorStats:
    """All counters of one connector process; ``clock`` gives wall-clock seconds (``time.time``)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.started = clock()
        self._hosts: dict[str, HostStats] = {}
        self._recent: deque[RecentError] = deque(maxlen=RECENT_ERRORS_ALL)
        self._mapped: set[str] = set()

    def set_mapped(self, virtuals: set[str]) -> None:
        """Tell which virtual hosts are mapped (they are always tracked; others only up to MAX_UNMAPPED)."""
        self._mapped = set(virtuals)

    def denied(self, virtual: str, reason: str) -> None:
        """A CONNECT to ``virtual`` was refused (no mapping, mapping disabled)."""
        self._error(virtual, "denied", reason)

    def failed(self, virtual: str, message: str) -> None:
        """A CONNECT to ``virtual`` was allowed but the internal host could not be reached."""
        self._error(virtual, "failed", message)

    def connected(self, virtual: str, stream: CountedStream) -> None:
        """The connection to the internal host of ``virtual`` is open (counted until :meth:`disconnected`)."""
        host = self._hosts.get(virtual)
        if host is None:  # an open connection always has a mapping: track it even past MAX_UNMAPPED
            host = self._hosts[virtual] = HostStats(virtual)
        host.total += 1
        host.last_used = self.clock()
        host.active[id(stream)] = stream

    def disconnected(self, virtual: str, stream: CountedStream) -> None:
        """The connection opened with :meth:`connected` ended; its bytes move to the closed totals."""
        host = self._hosts.get(virtual)
        if host is None or host.active.pop(id(stream), None) is None:
            return
        host.bytes_in_closed += stream.bytes_down
        host.bytes_out_closed += stream.bytes_up
        host.last_used = self.clock()

    def snapshot(self) -> dict[str, Any]:
        """Everything as JSON: ``{"since": ..., "hosts": [...], "recent_errors": [...], "totals": {...}}``."""
        hosts = [self._hosts[name].to_json() for name in sorted(self._hosts)]
        for name in sorted(self._mapped - self._hosts.keys()):
            hosts.append(HostStats(name).to_json())
        hosts.sort(key=lambda item: item["virtual"])
        for item in hosts:
            item["mapped"] = item["virtual"] in self._mapped
        totals = {
            key: sum(item[key] for item in hosts)
            for key in ("active", "total", "denied", "failed", "bytes_in", "bytes_out")
        }
        return {
            "since": _iso(self.started),
            "hosts": hosts,
            "totals": totals,
            "recent_errors": [error.to_json() for error in reversed(self._recent)],
        }

    def _error(self, virtual: str, kind: str, message: str) -> None:
        error = RecentError(self.clock(), virtual, kind, message)
        self._recent.append(error)
        host = self._host(virtual, create=True)
        if host is None:
            return
        if kind == "denied":
            host.denied += 1
        else:
            host.failed += 1
        host.errors.append(error)

    def _host(self, virtual: str, *, create: bool) -> HostStats | None:
        host = self._hosts.get(virtual)
        if host is None and create:
            unmapped = sum(1 for name in self._hosts if name not in self._mapped)
            if virtual not in self._mapped and unmapped >= MAX_UNMAPPED:
                return None
            host = self._hosts[virtual] = HostStats(virtual)
        return host


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
