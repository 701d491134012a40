"""The connector agent's decisions that need no network: renewal timing and reconnect backoff."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from postbridge.addresses import HostPort
from postbridge.connector import agent as agent_module
from postbridge.connector.agent import Connector, ConnectorConfig
from postbridge.connector.state import ConnectorState
from postbridge.trust import pki


def enrolled_state(home: Path) -> ConnectorState:
    ca_key, ca_cert = pki.create_ca("test hub CA")
    key = pki.generate_key()
    identity = pki.ConnectorIdentity("acme", "dc1", "c-test")
    cert = pki.issue_connector_certificate(ca_key, ca_cert, pki.build_csr(key, "x"), identity)
    state = ConnectorState(home)
    state.save(identity, HostPort("127.0.0.1", 1), pki.key_pem(key), pki.cert_pem(cert), pki.cert_pem(ca_cert))
    return state


@pytest.mark.parametrize(("fraction", "renewed"), [(0.9, False), (0.34, False), (0.32, True), (0.0, True)])
async def test_renews_when_a_third_of_the_lifetime_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fraction: float, renewed: bool
) -> None:
    state = enrolled_state(tmp_path)
    calls: list[ConnectorState] = []

    async def fake_renew(state: ConnectorState, **_: object) -> None:
        calls.append(state)

    monkeypatch.setattr(agent_module.pki, "remaining_lifetime_fraction", lambda cert: fraction)
    monkeypatch.setattr(agent_module.enrollment, "renew", fake_renew)
    connector = Connector(state, ConnectorConfig())
    stop = asyncio.Event()
    task = asyncio.create_task(connector._renewal_loop(stop))
    await asyncio.sleep(0.05)
    stop.set()
    task.cancel()
    assert bool(calls) is renewed


async def test_reconnect_waits_grow_and_stay_under_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = enrolled_state(tmp_path)
    config = ConnectorConfig(backoff_base=0.01, backoff_cap=0.08)
    connector = Connector(state, config)
    waits: list[float] = []
    stop = asyncio.Event()

    async def refused() -> None:
        from postbridge.errors import NetworkError

        if len(waits) >= 12:
            stop.set()
        raise NetworkError("refused")

    real_uniform = agent_module.random.uniform

    def record(low: float, high: float) -> float:
        waits.append(high)
        return real_uniform(low, high)

    monkeypatch.setattr(connector, "_connect", refused)
    monkeypatch.setattr(agent_module.random, "uniform", record)
    await asyncio.wait_for(connector.run(stop), 10)
    assert waits[:4] == [0.01, 0.02, 0.04, 0.08]
    assert max(waits) == 0.08  # capped
