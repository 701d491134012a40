"""The runtime end to end: `postbridge run` draining the real Dovecot into real targets, the message log and its CLI,
health and metrics, a target that fails for a while, and two workers sharing one real PostgreSQL."""

from __future__ import annotations

import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from postbridge.runtime.store import MessageStatus, open_store
from tests.harness import cli
from tests.runtime_lab import delivered, fill_folder, folder_count, start_runtime, wait_until, write_flows
from tests.servers import LOOPBACK, free_ports
from tests.servers.dovecot import Dovecot


def _counts(state_url: str, home: Path, flow: str = "drain") -> dict[MessageStatus, int]:
    store = open_store(state_url, home=home)
    try:
        return store.counts(flow)
    finally:
        store.close()


def test_run_once_drains_into_a_directory_and_the_log_tells_it(
    dovecot: Dovecot, keystore: Path, tmp_path: Path
) -> None:
    folder, ids = fill_folder(dovecot, keystore, 25, tag="once")
    out, state, home = tmp_path / "out", tmp_path / "state.db", tmp_path / "home"
    flows = write_flows(tmp_path / "flows.toml", folder=folder, out=out, keystore=keystore,
                        state=f"sqlite:///{state}", address=f"{dovecot.host}:{dovecot.imap_port}")  # fmt: skip
    checked = cli(home, "flows", "check", str(flows))
    assert "no problems" in checked.stdout and "drain" in checked.stdout
    never = cli(home, "flows", "status", str(flows), "--json", check=False)
    assert never.returncode == 1 and json.loads(never.stdout)[0]["healthy"] is False  # never polled: not healthy
    result = cli(home, "run", str(flows), "--once")
    assert "✓ drain" in result.stdout
    assert delivered(out).message_ids == set(ids)
    assert folder_count(dovecot, keystore, folder) == 0 and folder_count(dovecot, keystore, f"{folder}-done") == 25
    status = cli(home, "flows", "status", str(flows), "--json")
    row = json.loads(status.stdout)[0]
    assert row["healthy"] is True and row["post_processed"] == 25 and row["last_error"] == ""
    listed = json.loads(cli(home, "messages", "list", "--flows", str(flows), "--json", "--limit", "100").stdout)
    assert len(listed) == 25 and {r["status"] for r in listed} == {"post-processed"}
    assert all(r["target_ref"].endswith(".eml") and r["duration_ms"] is not None for r in listed)
    one = listed[0]
    shown = cli(home, "messages", "show", one["idempotency_key"], "--flows", str(flows))
    assert one["subject"] in shown.stdout and "post-processed" in shown.stdout
    table = cli(home, "messages", "list", "--flows", str(flows), "--search", f"{folder} #7", "--json")
    assert [r["subject"] for r in json.loads(table.stdout)] == [f"{folder} #7"]
    shown_table = cli(home, "messages", "list", "--flows", str(flows), "--search", f"{folder} #7").stdout
    assert "refused" in shown_table and "tries" not in shown_table  # delivered at once: 0 refusals, not "0 tries"
    again = cli(home, "run", str(flows), "--once")  # nothing new: nothing delivered twice
    assert "✓ drain" in again.stdout and len(list(out.glob("*.eml"))) == 25


def test_flows_check_reports_problems_with_lines(tmp_path: Path) -> None:
    bad = tmp_path / "flows.toml"
    bad.write_text('[runtime]\nstate = "mysql://x"\n\n[[flow]]\nname = "a"\nprotocol = "smtp"\n')
    result = cli(tmp_path / "home", "flows", "check", str(bad), check=False)
    assert result.returncode == 2
    assert f"{bad}:2" in result.stdout and f"{bad}:6" in result.stdout
    example = cli(tmp_path / "home", "flows", "example").stdout
    assert "[[flow]]" in example and "[flow.target]" in example


class _FlakyHandler(BaseHTTPRequestHandler):
    """503 for the first ``failures`` requests, then 201; remembers every idempotency key."""

    failures = 0
    seen: ClassVar[list[str]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.lock:
            type(self).seen.append(self.headers.get("Idempotency-Key", ""))
            failing = len(self.seen) <= self.failures
        self.send_response(503 if failing else 201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_http_target_that_fails_for_a_while_loses_nothing_and_shows_the_retries(
    dovecot: Dovecot, keystore: Path, tmp_path: Path
) -> None:
    folder, _ = fill_folder(dovecot, keystore, 20, tag="http")

    class Handler(_FlakyHandler):
        failures = 30
        seen: ClassVar[list[str]] = []

    server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state, home = tmp_path / "state.db", tmp_path / "home"
    url = f"http://{LOOPBACK}:{server.server_address[1]}/mail"
    flows = write_flows(tmp_path / "flows.toml", folder=folder, out=tmp_path / "unused", keystore=keystore,
                        state=f"sqlite:///{state}", address=f"{dovecot.host}:{dovecot.imap_port}",
                        target=f'kind = "http"\nurl = "{url}"\nformat = "raw"\n')  # fmt: skip
    runtime = start_runtime(home, flows, tmp_path / "runtime.log")
    try:
        wait_until(lambda: _counts(f"sqlite:///{state}", home).get(MessageStatus.POST_PROCESSED, 0) == 20, 90,
                   "every message to get through once the target recovered")  # fmt: skip
    finally:
        runtime.send_signal(signal.SIGTERM)
        runtime.wait(timeout=30)
        server.shutdown()
        server.server_close()
    accepted = Handler.seen[Handler.failures :]
    assert len(set(Handler.seen)) == 20  # 20 messages, each under one key on every attempt
    assert set(accepted) == set(Handler.seen)
    listed = json.loads(cli(home, "messages", "list", "--state", f"sqlite:///{state}", "--json").stdout)
    assert all(r["status"] == "post-processed" for r in listed) and len(listed) == 20
    retried = [r for r in listed if r["attempts"] >= 1]
    assert retried, "the 503s left no trace in the log"
    shown = json.loads(cli(home, "messages", "show", retried[0]["key"], "--state", f"sqlite:///{state}",
                           "--json").stdout)[0]  # fmt: skip
    outcomes = [attempt["outcome"] for attempt in shown["history"]]
    assert outcomes[-1] == "delivered" and set(outcomes[:-1]) == {"refused"} and len(outcomes) >= 2
    assert all("503" in attempt["detail"] for attempt in shown["history"][:-1])
    assert folder_count(dovecot, keystore, folder) == 0


def test_metrics_health_and_readiness(dovecot: Dovecot, keystore: Path, tmp_path: Path) -> None:
    folder, _ = fill_folder(dovecot, keystore, 5, tag="metrics")
    (port,) = free_ports(1)
    (closed,) = free_ports(1)
    state, home = tmp_path / "state.db", tmp_path / "home"
    flows = write_flows(tmp_path / "flows.toml", folder=folder, out=tmp_path / "out", keystore=keystore,
                        state=f"sqlite:///{state}", address=f"{dovecot.host}:{dovecot.imap_port}")  # fmt: skip
    text = flows.read_text().replace('metrics = ""', f'metrics = "{LOOPBACK}:{port}"')
    broken = text.replace("stale_after = 60", "stale_after = 2").replace('name = "drain"', 'name = "broken"')
    broken = broken.replace(f'address = "{dovecot.host}:{dovecot.imap_port}"', f'address = "{LOOPBACK}:{closed}"')
    flows.write_text(text + "\n" + broken[broken.index("[[flow]]") :])
    runtime = start_runtime(home, flows, tmp_path / "runtime.log")
    base = f"http://{LOOPBACK}:{port}"
    try:
        wait_until(lambda: _counts(f"sqlite:///{state}", home).get(MessageStatus.POST_PROCESSED, 0) == 5, 60,
                   "the healthy flow to drain")  # fmt: skip
        wait_until(lambda: httpx.get(f"{base}/readyz").status_code == 503, 30, "the broken flow to go stale")
        metrics = httpx.get(f"{base}/metrics").text
        ready = httpx.get(f"{base}/readyz").json()
        health = httpx.get(f"{base}/healthz")
    finally:
        runtime.send_signal(signal.SIGTERM)
        runtime.wait(timeout=30)
    assert 'postbridge_messages_total{flow="drain",outcome="delivered"} 5.0' in metrics
    assert 'postbridge_flow_healthy{flow="drain"} 1.0' in metrics
    assert 'postbridge_flow_healthy{flow="broken"} 0.0' in metrics
    assert 'postbridge_polls_total{flow="broken",result="failed"}' in metrics
    assert health.status_code == 200 and ready["unhealthy"] == ["broken"]
    log = (tmp_path / "runtime.log").read_text(errors="replace")
    assert "flow broken is UNHEALTHY" in log
    status = cli(home, "flows", "status", str(flows), check=False)
    assert status.returncode == 1 and "UNHEALTHY" in status.stdout


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_two_workers_on_one_postgresql_split_the_flows_and_take_over(
    dovecot: Dovecot, keystore: Path, tmp_path: Path, postgres: object
) -> None:
    url = postgres.new_database()  # type: ignore[attr-defined]
    folders = [fill_folder(dovecot, keystore, 150, tag=f"pg{n}") for n in range(4)]
    out = tmp_path / "out"
    flows = write_flows(tmp_path / "flows.toml", folder=folders[0][0], out=out, keystore=keystore, state=url,
                        address=f"{dovecot.host}:{dovecot.imap_port}", interval=0.3, lease=3)  # fmt: skip
    text = flows.read_text()
    first_flow = text[text.index("[[flow]]") :]
    for number, (folder, _) in enumerate(folders[1:], start=1):
        text += "\n" + first_flow.replace('name = "drain"', f'name = "drain{number}"').replace(folders[0][0], folder)
    flows.write_text(text)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [start_runtime(tmp_path / "home", flows, logs[0], "--worker", "worker-a"),
               start_runtime(tmp_path / "home", flows, logs[1], "--worker", "worker-b")]  # fmt: skip
    names = ["drain", "drain1", "drain2", "drain3"]
    pollers: set[str] = set()
    try:
        deadline = time.monotonic() + 20
        while pollers != {"worker-a", "worker-b"} and time.monotonic() < deadline:  # both take flows
            store = open_store(url, home=tmp_path)
            try:
                pollers |= {entry.owner for entry in store.health() if entry.polls}
            finally:
                store.close()
            time.sleep(0.1)
        before_kill = delivered(out)
        workers[0].send_signal(signal.SIGKILL)  # it dies holding whatever leases it had
        workers[0].wait(timeout=10)
        wait_until(
            lambda: all(_counts(url, tmp_path, name).get(MessageStatus.POST_PROCESSED, 0) == 150 for name in names),
            240, "worker-b to take over and drain every flow",
        )  # fmt: skip
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                worker.wait(timeout=30)
    assert pollers == {"worker-a", "worker-b"}, f"the flows were not split: only {pollers} polled"
    assert all(count == 1 for count in before_kill.deliveries.values()), "a message was delivered twice"
    got = delivered(out)
    assert got.message_ids == {i for _, ids in folders for i in ids}
    assert all(len(keys) == 1 for keys in got.keys_by_message_id.values())
    assert sum(count - 1 for count in got.deliveries.values()) <= len(names)  # at most one in flight per flow


def test_idle_flow_hands_on_new_mail_without_waiting_for_an_interval(
    dovecot: Dovecot, keystore: Path, tmp_path: Path
) -> None:
    from postbridge.mail.imap import append, open_session
    from tests.runtime_lab import direct_channel

    folder, _ = fill_folder(dovecot, keystore, 3, tag="idle")
    out, state, home = tmp_path / "out", tmp_path / "state.db", tmp_path / "home"
    flows = write_flows(tmp_path / "flows.toml", folder=folder, out=out, keystore=keystore,
                        state=f"sqlite:///{state}", address=f"{dovecot.host}:{dovecot.imap_port}",
                        interval=300, extra_flow='mode = "idle"')  # fmt: skip
    flows.write_text(flows.read_text().replace("stale_after = 60", "stale_after = 600"))
    runtime = start_runtime(home, flows, tmp_path / "runtime.log")
    try:
        wait_until(lambda: len(delivered(out).message_ids) == 3, 30, "the catch-up poll")
        raw = f"Subject: late\r\nMessage-ID: <late.{folder}@test.example>\r\n\r\nhi\r\n".encode()
        with open_session(direct_channel(dovecot, keystore)) as session:
            append(session, folder, raw)
        started = time.monotonic()
        wait_until(lambda: len(delivered(out).message_ids) == 4, 20, "IDLE to report the new message")
        took = time.monotonic() - started
    finally:
        runtime.send_signal(signal.SIGTERM)
        runtime.wait(timeout=30)
    assert took < 20  # the interval is 300 s: only IDLE can have woken the flow
    assert f"<late.{folder}@test.example>" in delivered(out).message_ids


def test_pop3_flow_deletes_only_after_the_target_accepted(dovecot: Dovecot, keystore: Path, tmp_path: Path) -> None:
    import uuid

    subject = f"pop3 flow {uuid.uuid4().hex}"
    for number in range(3):
        dovecot.deliver("bob", f"Subject: {subject} {number}\r\nMessage-ID: <{number}.{subject.split()[-1]}@t>\r\n"
                               f"\r\nbody\r\n".encode())  # fmt: skip
    out, state, home = tmp_path / "out", tmp_path / "state.db", tmp_path / "home"
    flows = tmp_path / "flows.toml"
    flows.write_text(f"""[runtime]
state = "sqlite:///{state}"
metrics = ""

[[flow]]
name = "pop"
protocol = "pop3"

[flow.sender]
address = "{dovecot.host}:{dovecot.pop3_port}"
protection = "starttls-mandatory"
tls_server_name = "mail.corp.example"
keystore = "{keystore}"
user = "bob"
password = "secret"
post_processing = "keep"

[flow.target]
kind = "directory"
path = "{out}"
""")
    cli(home, "run", str(flows), "--once")
    subjects = {str(__import__("email").message_from_bytes(p.read_bytes())["Subject"]) for p in out.glob("*.eml")}
    assert {f"{subject} {n}" for n in range(3)} <= subjects
    again = cli(home, "run", str(flows), "--once")  # kept on the server, but the log knows: not handed on twice
    assert "✓ pop" in again.stdout
    assert len(list(out.glob("*.eml"))) == len(subjects)
