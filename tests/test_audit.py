"""Audit log: record shape, permissions, reading back, rotation and the guard against secrets."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from postbridge.connector.audit import AuditLog
from postbridge.errors import ConfigurationError, PostbridgeError

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    return AuditLog(tmp_path / "connector" / "audit.log")


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def allow(log: AuditLog, trace_id: str = "t-1") -> None:
    log.access(
        allowed=True,
        subaccount="acme",
        location="dc1",
        virtual="mail.corp:143",
        internal="10.1.2.3:143",
        trace_id=trace_id,
    )


def test_access_records(log: AuditLog) -> None:
    allow(log)
    log.access(
        allowed=False,
        subaccount="acme",
        location="dc1",
        virtual="evil.corp:22",
        internal=None,
        trace_id="t-2",
        reason="not-allowed",
    )
    first, second = lines(log.path)
    assert TIME.match(str(first.pop("time")))
    assert first == {
        "event": "access-allowed",
        "subaccount": "acme",
        "location": "dc1",
        "virtual": "mail.corp:143",
        "internal": "10.1.2.3:143",
        "trace_id": "t-1",
        "reason": "",
    }
    assert second["event"] == "access-denied"
    assert second["internal"] is None
    assert second["reason"] == "not-allowed"


def test_config_change_record(log: AuditLog) -> None:
    log.config_change(action="mapping-add", detail={"virtual": "mail.corp:143", "protocol": "tcp"})
    log.config_change(action="enroll", detail={"location": "dc1"}, actor="connector")
    first, second = lines(log.path)
    assert first["event"] == "config-change"
    assert first["action"] == "mapping-add"
    assert first["actor"] == "cli"
    assert first["detail"] == {"virtual": "mail.corp:143", "protocol": "tcp"}
    assert second["actor"] == "connector"
    assert list(first)[:2] == ["time", "event"]


def test_file_is_private_and_appended(log: AuditLog) -> None:
    allow(log)
    allow(AuditLog(log.path), "t-2")  # a second writer (e.g. the CLI) appends to the same file
    assert log.path.stat().st_mode & 0o777 == 0o600
    assert log.path.parent.stat().st_mode & 0o777 == 0o700
    assert [record["trace_id"] for record in lines(log.path)] == ["t-1", "t-2"]


def test_existing_file_with_loose_permissions_is_tightened(log: AuditLog) -> None:
    log.path.parent.mkdir(parents=True)
    log.path.write_text("")
    log.path.chmod(0o644)
    allow(log)
    assert log.path.stat().st_mode & 0o777 == 0o600


def test_values_cannot_break_the_line_structure(log: AuditLog) -> None:
    log.access(
        allowed=False,
        subaccount="acme",
        location='dc1\n{"event": "access-allowed"}',
        virtual="x:1",
        internal=None,
        trace_id="t",
    )
    records = lines(log.path)
    assert len(records) == 1
    assert records[0]["event"] == "access-denied"


def test_read_newest_last_with_limit_and_broken_lines(log: AuditLog) -> None:
    for number in range(5):
        allow(log, f"t-{number}")
    with log.path.open("a", encoding="utf-8") as handle:
        handle.write('{"time": "cut by a cra\n[1, 2]\n')
    allow(log, "t-5")
    assert [record["trace_id"] for record in log.read()] == [f"t-{number}" for number in range(6)]
    assert [record["trace_id"] for record in log.read(limit=2)] == ["t-4", "t-5"]
    assert log.read(limit=0) == []


def test_read_missing_file_is_empty(log: AuditLog) -> None:
    assert log.read() == []


def test_default_rotation_limit_is_10_mib_keeping_5(log: AuditLog) -> None:
    assert (log.max_bytes, log.backups) == (10 * 1024 * 1024, 5)


def test_rotation_keeps_five_old_files(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", max_bytes=1000)
    record_size = 0
    for number in range(80):
        allow(log, f"t-{number:03d}")
        if number == 0:
            record_size = log.path.stat().st_size
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["audit.log", *(f"audit.log.{number}" for number in range(1, 6))]
    for path in tmp_path.iterdir():
        assert path.stat().st_size <= 1000
        assert path.stat().st_mode & 0o777 == 0o600
    per_file = 1000 // record_size
    assert len(lines(tmp_path / "audit.log.1")) == per_file
    # the oldest records were dropped; audit.log holds the newest, audit.log.1 the ones just before
    newest = [record["trace_id"] for record in lines(log.path)]
    assert newest[-1] == "t-079"
    assert lines(tmp_path / "audit.log.1")[-1]["trace_id"] == f"t-{80 - len(newest) - 1:03d}"
    kept = sum(len(lines(path)) for path in tmp_path.iterdir())
    assert kept < 80
    # read() continues into the rotated files when the current one holds fewer than `limit` records
    across = log.read(limit=len(newest) + 3)
    assert [record["trace_id"] for record in across] == [
        f"t-{number:03d}" for number in range(80 - len(newest) - 3, 80)
    ]
    assert len(log.read(limit=10_000)) == kept


@pytest.mark.parametrize(
    "detail",
    [
        {"password": "x"},
        {"client_secret": "x"},
        {"Token": "x"},
        {"mapping": {"virtual": "a:1", "access_token": "x"}},
        {"entries": [{"alias": "a"}, {"private_key": "x"}]},
        {"api-key": "x"},
        {"passphrase": "x"},
    ],
)
def test_secret_like_keys_are_refused(log: AuditLog, detail: dict[str, object]) -> None:
    with pytest.raises(PostbridgeError, match="named like a secret"):
        log.config_change(action="credential-set", detail=detail)
    assert not log.path.exists()


def test_refusal_names_the_key_but_never_the_value(log: AuditLog) -> None:
    with pytest.raises(PostbridgeError) as info:
        log.config_change(action="x", detail={"outer": {"user_password": "hunter2"}})
    assert "'outer.user_password'" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_harmless_keys_pass(log: AuditLog) -> None:
    log.config_change(action="trust-add", detail={"alias": "corp-root", "fingerprint": "ab:cd", "bypass": False})
    assert lines(log.path)[0]["detail"]["alias"] == "corp-root"  # type: ignore[index]


def test_unwritable_log_is_a_configuration_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    log = AuditLog(blocker / "audit.log")
    with pytest.raises(ConfigurationError, match="not-a-folder"):
        allow(log)


def test_concurrent_writers_do_not_interleave(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")

    def write(worker: int) -> None:
        for number in range(200):
            allow(log, f"{worker}-{number}-" + "x" * 500)

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = lines(log.path)
    assert len(records) == 800
    assert {record["trace_id"] for record in records} == {
        f"{worker}-{number}-" + "x" * 500 for worker in range(4) for number in range(200)
    }
