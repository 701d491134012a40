"""Which connectors are connected, by subaccount and location ID, and which one gets the next stream.

Several connectors may serve the same subaccount and location: all are active and new streams go to the healthy one
with the fewest open streams (no master/shadow failover gap). A connector that reconnects with the same identity
evicts its old session at once. This module must not do I/O beyond closing evicted sessions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from postbridge.trust.pki import ConnectorIdentity
from postbridge.tunnel.session import TunnelSession

log = logging.getLogger("postbridge.hub")


@dataclass
class ConnectedConnector:
    identity: ConnectorIdentity
    session: TunnelSession
    peer: str
    connected_at: float = field(default_factory=time.time)
    info: dict[str, Any] = field(default_factory=dict)  # the connector's last answer to GET /v1/info

    @property
    def healthy(self) -> bool:
        return self.session.is_open and not self.session.draining and self.session.core.can_open_stream()

    def describe(self) -> dict[str, Any]:
        return {
            "connector_id": self.identity.connector_id,
            "subaccount": self.identity.subaccount,
            "location": self.identity.location,
            "peer": self.peer,
            "connected_since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.connected_at)),
            "active_streams": len(self.session.sinks),
            "rtt_ms": None if self.session.rtt_ms is None else round(self.session.rtt_ms, 2),
            "draining": self.session.draining,
            "version": self.info.get("version"),
            "mappings": self.info.get("mappings", []),
        }


class Registry:
    """Connected connectors. All methods are synchronous and called on the event loop thread."""

    def __init__(self) -> None:
        self._by_id: dict[tuple[str, str], ConnectedConnector] = {}
        self._turn = 0  # round-robin among equally loaded connectors

    def register(self, entry: ConnectedConnector) -> None:
        """Add a connector; an older session of the same identity is closed at once."""
        key = (entry.identity.subaccount, entry.identity.connector_id)
        old = self._by_id.get(key)
        if old is not None and old.session is not entry.session:
            log.warning(
                "connector %s of subaccount %s reconnected from %s: closing its old session from %s",
                entry.identity.connector_id,
                entry.identity.subaccount,
                entry.peer,
                old.peer,
            )
            old.session.abort("replaced by a new session of the same connector")
        self._by_id[key] = entry
        log.info(
            "connector %s connected for subaccount %s, location %r from %s",
            entry.identity.connector_id,
            entry.identity.subaccount,
            entry.identity.location,
            entry.peer,
        )

    def unregister(self, entry: ConnectedConnector) -> None:
        key = (entry.identity.subaccount, entry.identity.connector_id)
        if self._by_id.get(key) is entry:
            del self._by_id[key]
            log.info(
                "connector %s (subaccount %s, location %r) disconnected: %s",
                entry.identity.connector_id,
                entry.identity.subaccount,
                entry.identity.location,
                entry.session.close_reason or "closed",
            )

    def pick(self, subaccount: str, location: str) -> ConnectedConnector | None:
        """The healthy connector for (subaccount, location) with the fewest open streams, or None.

        Ties (typically: all idle) are broken round-robin, so sequential connections use every connector.
        """
        candidates = [e for e in self.at(subaccount, location) if e.healthy]
        if not candidates:
            return None
        fewest = min(len(e.session.sinks) for e in candidates)
        least = sorted((e for e in candidates if len(e.session.sinks) == fewest), key=lambda e: e.identity.connector_id)
        self._turn += 1
        return least[self._turn % len(least)]

    def at(self, subaccount: str, location: str) -> list[ConnectedConnector]:
        return [
            e
            for e in self._by_id.values()
            if e.identity.subaccount == subaccount and e.identity.location == location and e.session.is_open
        ]

    def of_subaccount(self, subaccount: str) -> list[ConnectedConnector]:
        return sorted(
            (e for e in self._by_id.values() if e.identity.subaccount == subaccount and e.session.is_open),
            key=lambda e: (e.identity.location, e.identity.connector_id),
        )

    def all(self) -> list[ConnectedConnector]:
        return [e for e in self._by_id.values() if e.session.is_open]

    def locations(self, subaccount: str) -> list[str]:
        return sorted({e.identity.location for e in self.of_subaccount(subaccount)})
