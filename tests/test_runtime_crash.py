"""Crash safety of the runtime: mail drained through a real hub and connector from the real Dovecot into a directory
target while the runtime, the hub or the connector is killed with SIGKILL at random points (bounded in count and
time). Afterwards nothing is lost, every duplicate carries the same idempotency key, and the mailbox's
post-processing matches the message log."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from postbridge.runtime.store import MessageStatus, open_store
from tests.harness import Connector, Stack
from tests.runtime_lab import (
    binding_file,
    delivered,
    fill_folder,
    folder_count,
    start_runtime,
    wait_until,
    write_flows,
)
from tests.servers.dovecot import Dovecot

MESSAGES = 1000
KILLS = 10


def _check_outcome(dovecot: Dovecot, keystore: Path, folder: str, ids: list[str], out: Path, state: Path) -> int:
    """Every message in the target under one idempotency key, the mailbox drained into the archive, the log
    final for all. Returns the number of duplicate deliveries seen."""
    got = delivered(out)
    missing = set(ids) - got.message_ids
    assert not missing, f"{len(missing)} message(s) lost, e.g. {sorted(missing)[:3]}"
    assert got.message_ids == set(ids)
    assert all(len(keys) == 1 for keys in got.keys_by_message_id.values()), "a message arrived under two keys"
    assert folder_count(dovecot, keystore, folder) == 0
    assert folder_count(dovecot, keystore, f"{folder}-done") == len(ids)
    store = open_store(f"sqlite:///{state}", home=state.parent)
    try:
        counts = store.counts("drain")
        records = store.list(flow="drain", limit=len(ids) + 10)
    finally:
        store.close()
    assert counts.get(MessageStatus.POST_PROCESSED, 0) == len(ids), counts
    assert sum(counts.values()) == len(ids), counts
    assert {r.idempotency_key for r in records} == set().union(*got.keys_by_message_id.values())
    return sum(count - 1 for count in got.deliveries.values())


def _drained(state: Path, total: int) -> bool:
    if not state.exists():
        return False
    store = open_store(f"sqlite:///{state}", home=state.parent)
    try:
        return store.counts("drain").get(MessageStatus.POST_PROCESSED, 0) >= total
    finally:
        store.close()


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_runtime_killed_ten_times_while_draining_loses_nothing(
    stack: Stack, connected: Connector, dovecot: Dovecot, keystore: Path, tmp_path: Path
) -> None:
    stack.map(connected, "mail.corp.example:143", f"{dovecot.host}:{dovecot.imap_port}")
    folder, ids = fill_folder(dovecot, keystore, MESSAGES, tag="kill")
    out, state = tmp_path / "out", tmp_path / "state.db"
    flows = write_flows(
        tmp_path / "flows.toml", folder=folder, out=out, keystore=keystore, state=f"sqlite:///{state}",
        address="mail.corp.example:143", binding=binding_file(stack, tmp_path / "binding.json"),
    )  # fmt: skip
    home, log = tmp_path / "home", tmp_path / "runtime.log"
    rng = random.Random(20261129)
    progress: list[int] = []
    for _ in range(KILLS):
        process = start_runtime(home, flows, log)
        time.sleep(rng.uniform(1.0, 2.5))  # start-up takes about a second: kills land before, during and after work
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        progress.append(len(delivered(out).message_ids))
    final = start_runtime(home, flows, log)
    try:
        wait_until(lambda: _drained(state, MESSAGES), 240, "the runtime to drain every message")
    finally:
        final.send_signal(signal.SIGTERM)
        final.wait(timeout=60)
    assert progress[-1] > 0, f"the kills all came before any delivery: {progress}"
    assert progress[0] < MESSAGES, f"the first run drained everything before its kill: {progress}"
    duplicates = _check_outcome(dovecot, keystore, folder, ids, out, state)
    print(f"{KILLS} SIGKILLs, delivered after each: {progress}; duplicate deliveries: {duplicates}")


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_hub_and_connector_killed_while_draining_loses_nothing(
    stack: Stack, connected: Connector, dovecot: Dovecot, keystore: Path, tmp_path: Path
) -> None:
    stack.map(connected, "mail.corp.example:143", f"{dovecot.host}:{dovecot.imap_port}")
    folder, ids = fill_folder(dovecot, keystore, MESSAGES, tag="hub")
    out, state = tmp_path / "out", tmp_path / "state.db"
    flows = write_flows(
        tmp_path / "flows.toml", folder=folder, out=out, keystore=keystore, state=f"sqlite:///{state}",
        address="mail.corp.example:143", binding=binding_file(stack, tmp_path / "binding.json"),
    )  # fmt: skip
    runtime = start_runtime(tmp_path / "home", flows, tmp_path / "runtime.log")
    rng = random.Random(11)
    try:
        for round_number in range(6):  # 3 hub kills and 3 connector kills, alternating
            time.sleep(rng.uniform(0.5, 1.5))
            if round_number % 2 == 0:
                assert stack.hub is not None
                stack.hub.kill()
                stack.start_hub()
                stack.wait_connected(connected.identity["connector_id"])  # the connector dials the new hub
            else:
                assert connected.process is not None
                connected.process.kill()
                stack.start_connector(connected)
        wait_until(lambda: _drained(state, MESSAGES), 240, "the runtime to drain every message")
    finally:
        runtime.send_signal(signal.SIGTERM)
        runtime.wait(timeout=60)
    _check_outcome(dovecot, keystore, folder, ids, out, state)
    log = (tmp_path / "runtime.log").read_text(errors="replace")
    assert "poll failed" in log  # the kills were noticed, and survived
