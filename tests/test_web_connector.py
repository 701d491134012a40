"""The connector UI's JSON API (and its form pages) on a REAL ``postbridge connector run --ui-listen`` process.

One hub and one connector (with its UI on a free loopback port) serve the whole module; the administrator password
is set beforehand with ``postbridge connector admin set-password --password-stdin``. Tests that throttle logins or
need a first start use a second connector of the same hub. Every change is made through the API (or a form), then
observed from outside: the API's answers, the files in the connector's home, the audit log, the hub's view of the
tunnel, and SOCKS5 requests through the hub.
"""

from __future__ import annotations

import csv
import io
import json
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.harness import Connector, Stack, cli, socks_connect
from tests.servers import LOOPBACK, free_port, wait_for_port
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPki

pytestmark = pytest.mark.e2e

PASSWORD = "web ui secret 1"
MIB = 1024 * 1024


@dataclass
class Ui:
    stack: Stack
    connector: Connector
    url: str

    @property
    def state_dir(self) -> Path:
        return self.connector.home / "connector"

    def client(self) -> httpx.Client:
        """A logged-in API client that sends the CSRF token with every request."""
        client = httpx.Client(base_url=self.url, timeout=30)
        answer = client.post("/api/v1/login", json={"password": PASSWORD})
        assert answer.status_code == 200, answer.text
        client.headers["X-CSRF-Token"] = answer.json()["csrf_token"]
        return client

    def audit(self) -> list[dict[str, Any]]:
        path = self.state_dir / "audit.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def tunnel(self) -> dict[str, Any]:
        """The hub's view of this connector's tunnel."""
        mine = [c for c in self.stack.connected() if c["connector_id"] == self.connector.identity["connector_id"]]
        assert len(mine) == 1, mine
        return mine[0]


def start_ui(stack: Stack, connector: Connector) -> str:
    port = free_port()
    process = stack.start_connector(connector, "--ui-listen", f"{LOOPBACK}:{port}")
    wait_for_port(port, alive=process.alive)
    return f"http://{LOOPBACK}:{port}"


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ui]:
    stack = Stack(tmp_path_factory.mktemp("web-connector")).init()
    stack.start_hub()
    try:
        connector = stack.enroll("dc1")
        cli(connector.home, "connector", "admin", "set-password", "--password-stdin", stdin=PASSWORD + "\n")
        yield Ui(stack, connector, start_ui(stack, connector))
    finally:
        stack.stop()


@pytest.fixture
def api(ui: Ui) -> Iterator[httpx.Client]:
    client = ui.client()
    try:
        yield client
    finally:
        client.close()


def socks(ui: Ui, host: str, port: int) -> int:
    reply, sock = socks_connect(ui.stack.socks_port, host, port, "acme/dc1", ui.stack.secret)
    sock.close()
    return reply


# -- login and sessions ---------------------------------------------------------------------------------------------


def test_set_password_stores_only_an_argon2_hash(ui: Ui) -> None:
    text = (ui.state_dir / "admin.json").read_text()
    assert PASSWORD not in text and '"$argon2id$' in text
    assert (ui.state_dir / "admin.json").stat().st_mode & 0o777 == 0o600
    short = cli(
        ui.connector.home, "connector", "admin", "set-password", "--password-stdin", stdin="short\n", check=False
    )
    assert short.returncode == 2 and "too short" in short.stderr
    assert (ui.state_dir / "admin.json").read_text() == text  # nothing changed


def test_login_wrong_password_401_right_password_session(ui: Ui) -> None:
    with httpx.Client(base_url=ui.url) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/api/v1/mappings").status_code == 401
        page = client.get("/mappings")
        assert page.status_code == 303 and page.headers["location"] == "/login?next=%2Fmappings"
        wrong = client.post("/api/v1/login", json={"password": "not it"})
        assert wrong.status_code == 401
        assert wrong.json()["error"] == "wrong password" and wrong.json()["hint"]
        assert "not it" not in wrong.text
        right = client.post("/api/v1/login", json={"password": PASSWORD})
        assert right.status_code == 200
        assert "httponly" in right.headers["set-cookie"].lower()
        assert client.get("/api/v1/mappings").status_code == 200
        status = client.get("/api/v1/status").json()
        assert status["connected"] is True
        assert status["connector_id"] == ui.connector.identity["connector_id"]
        assert status["subaccount"] == "acme" and status["location"] == "dc1"
        assert status["hub"] == f"{LOOPBACK}:{ui.stack.tunnel_port}"
        assert status["certificate"]["days_left"] >= 29 and status["certificate"]["warning"] is None


def test_first_start_prints_a_password_once_and_logins_are_throttled(ui: Ui) -> None:
    second = ui.stack.enroll("dc2", name="second")
    url = start_ui(ui.stack, second)
    assert second.process is not None
    console = second.process.log()
    printed = [line.split()[-1] for line in console.splitlines() if line.startswith("***   ")]
    assert len(printed) == 1, console
    trace = (second.home / "connector" / "trace.log").read_text()
    assert printed[0] not in trace  # the console only, never the log file
    with httpx.Client(base_url=url) as client:
        assert client.post("/api/v1/login", json={"password": printed[0]}).status_code == 200
        for _ in range(5):
            assert client.post("/api/v1/login", json={"password": "guess"}).status_code == 401
        throttled = client.post("/api/v1/login", json={"password": printed[0]})
        assert throttled.status_code == 429
        assert "too many failed logins" in throttled.json()["error"]
        assert 0 < int(throttled.headers["retry-after"]) <= 60
    second.process.stop()
    ui.stack.start_connector(second, "--ui-listen", f"{LOOPBACK}:{free_port()}")
    assert second.process.log().count("***   ") == 1  # a password exists now: nothing printed at the restart
    second.process.stop()


def test_csrf_token_required_for_every_change(ui: Ui, api: httpx.Client) -> None:
    before = (ui.state_dir / "mappings.json").read_bytes() if (ui.state_dir / "mappings.json").exists() else b""
    body = {"virtual": "csrf.corp.example:143", "internal": f"{LOOPBACK}:1"}
    without = api.post("/api/v1/mappings", json=body, headers={"X-CSRF-Token": ""})
    assert without.status_code == 403 and "CSRF" in without.json()["error"]
    wrong = api.post("/api/v1/mappings", json=body, headers={"X-CSRF-Token": "forged"})
    assert wrong.status_code == 403
    form = api.post("/mappings", data=body, headers={"X-CSRF-Token": ""})  # a form without its hidden field
    assert form.status_code == 403
    assert (
        api.put("/api/v1/settings/log-level", json={"level": "info"}, headers={"X-CSRF-Token": ""}).status_code == 403
    )
    after = (ui.state_dir / "mappings.json").read_bytes() if (ui.state_dir / "mappings.json").exists() else b""
    assert after == before
    assert "csrf.corp.example:143" not in json.dumps(api.get("/api/v1/mappings").json())


# -- mappings -------------------------------------------------------------------------------------------------------


def test_mapping_actions_audited_and_the_tunnel_stays_up(ui: Ui, api: httpx.Client) -> None:
    tunnel = ui.tunnel()
    virtual = "life.corp.example:143"
    added = api.post("/api/v1/mappings", json={"virtual": virtual, "internal": f"{LOOPBACK}:1143"})
    assert added.status_code == 201, added.text
    assert added.json()["mapping"] == {
        "virtual": virtual,
        "internal": f"{LOOPBACK}:1143",
        "protocol": "tcp",
        "tls_server_name": None,
        "description": "",
        "enabled": True,
    }
    assert api.get(f"/api/v1/mappings/{virtual}").json()["internal"] == f"{LOOPBACK}:1143"
    assert virtual in cli(ui.connector.home, "connector", "mapping", "list").stdout  # one store for CLI and UI

    changed = api.patch(f"/api/v1/mappings/{virtual}", json={"internal": f"{LOOPBACK}:2143", "description": "new"})
    assert changed.status_code == 200 and changed.json()["mapping"]["internal"] == f"{LOOPBACK}:2143"
    assert api.post(f"/api/v1/mappings/{virtual}/disable").json()["mapping"]["enabled"] is False
    assert socks(ui, "life.corp.example", 143) == 0x02  # disabled = denied
    assert api.post(f"/api/v1/mappings/{virtual}/enable").json()["mapping"]["enabled"] is True
    removed = api.delete(f"/api/v1/mappings/{virtual}")
    assert removed.status_code == 200 and removed.json()["removed"]["internal"] == f"{LOOPBACK}:2143"
    gone = api.delete(f"/api/v1/mappings/{virtual}")
    assert gone.status_code == 404 and "no mapping for virtual address life.corp.example:143" in gone.json()["error"]
    assert api.get(f"/api/v1/mappings/{virtual}").status_code == 404

    actions = [
        (record["action"], record["actor"])
        for record in ui.audit()
        if record["event"] == "config-change" and _virtual_of(record) == virtual
    ]
    assert actions == [
        ("mapping-add", "web:admin"),
        ("mapping-update", "web:admin"),
        ("mapping-disable", "web:admin"),
        ("mapping-enable", "web:admin"),
        ("mapping-remove", "web:admin"),
    ]
    after = ui.tunnel()
    assert (after["connected_since"], after["peer"]) == (tunnel["connected_since"], tunnel["peer"])
    assert api.get("/api/v1/status").json()["reconnects"] == 0


def _virtual_of(record: dict[str, Any]) -> str:
    detail = record.get("detail") or {}
    return str(detail.get("virtual", ""))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"virtual": "nohost", "internal": "10.0.0.1:143"}, "virtual host 'nohost' has no port"),
        ({"virtual": "bad.corp:99999", "internal": "10.0.0.1:143"}, "port 99999 outside 1-65535"),
        ({"virtual": "bad.corp:143", "internal": "10.0.0.1:x"}, "internal host '10.0.0.1:x' has port 'x'"),
        ({"virtual": "bad.corp:143", "internal": "10.0.0.1:143", "protocol": "udp"}, "unknown protocol 'udp'"),
        (
            {"virtual": "bad.corp:143", "internal": "10.0.0.1:143", "tls_server_name": "mail.corp"},
            "has TLS server name 'mail.corp' but protocol 'tcp'",
        ),
    ],
)
def test_invalid_mapping_is_422_and_nothing_is_saved(
    ui: Ui, api: httpx.Client, body: dict[str, str], message: str
) -> None:
    before = api.get("/api/v1/mappings").json()
    audit_before = len(ui.audit())
    answer = api.post("/api/v1/mappings", json=body)
    assert answer.status_code == 422, answer.text
    assert message in answer.json()["error"]
    assert answer.json()["hint"]
    assert api.get("/api/v1/mappings").json() == before
    assert len(ui.audit()) == audit_before


def test_duplicate_mapping_is_409_and_the_first_one_stays(ui: Ui, api: httpx.Client) -> None:
    virtual = "dup.corp.example:25"
    assert api.post("/api/v1/mappings", json={"virtual": virtual, "internal": f"{LOOPBACK}:2525"}).status_code == 201
    saved = (ui.state_dir / "mappings.json").read_bytes()
    again = api.post("/api/v1/mappings", json={"virtual": "DUP.corp.example:25", "internal": f"{LOOPBACK}:9"})
    assert again.status_code == 409
    assert again.json()["error"] == f"virtual address {virtual} is already mapped to {LOOPBACK}:2525 (tcp)"
    assert (ui.state_dir / "mappings.json").read_bytes() == saved
    bad_edit = api.patch(f"/api/v1/mappings/{virtual}", json={"internal": "no port"})
    assert bad_edit.status_code == 422 and "internal host 'no port'" in bad_edit.json()["error"]
    assert (ui.state_dir / "mappings.json").read_bytes() == saved
    missing = api.patch("/api/v1/mappings/none.corp.example:25", json={"internal": f"{LOOPBACK}:25"})
    assert missing.status_code == 404 and "dup.corp.example:25" in missing.json()["error"]  # lists what exists
    api.delete(f"/api/v1/mappings/{virtual}")


def test_mapping_forms_show_the_error_and_keep_the_input(ui: Ui, api: httpx.Client) -> None:
    token = api.headers["X-CSRF-Token"]
    form = {"csrf_token": token, "virtual": "form.corp.example:143", "internal": "10.0.0.1", "protocol": "tcp"}
    page = api.post("/mappings", data=form, headers={"X-CSRF-Token": ""})
    assert page.status_code == 422
    assert 'role="alert"' in page.text and "internal host &#39;10.0.0.1&#39; has no port" in page.text
    assert 'value="form.corp.example:143"' in page.text and 'value="10.0.0.1"' in page.text  # input kept
    form["internal"] = f"{LOOPBACK}:1143"
    done = api.post("/mappings", data=form, headers={"X-CSRF-Token": ""})
    assert done.status_code == 303 and done.headers["location"] == "/mappings"
    listing = api.get("/mappings")
    assert "mapped form.corp.example:143 -&gt; 127.0.0.1:1143 (tcp)" in listing.text  # the flash after the redirect
    duplicate = api.post("/mappings", data=form, headers={"X-CSRF-Token": ""})
    assert duplicate.status_code == 409 and "is already mapped" in duplicate.text
    edit = api.post(
        "/mappings/edit",
        data={"csrf_token": token, "virtual": "form.corp.example:143", "internal": "x:y", "protocol": "tcp"},
        headers={"X-CSRF-Token": ""},
    )
    assert edit.status_code == 422 and 'value="x:y"' in edit.text and 'role="alert"' in edit.text
    removed = api.post(
        "/mappings/remove", data={"csrf_token": token, "virtual": "form.corp.example:143"}, headers={"X-CSRF-Token": ""}
    )
    assert removed.status_code == 303
    assert "form.corp.example:143" not in json.dumps(api.get("/api/v1/mappings").json())


def test_check_one_and_all_against_the_real_dovecot(ui: Ui, api: httpx.Client, dovecot: Dovecot) -> None:
    api.post(
        "/api/v1/mappings",
        json={"virtual": "imap.check.example:143", "internal": f"{dovecot.host}:{dovecot.imap_port}"},
    )
    api.post("/api/v1/mappings", json={"virtual": "down.check.example:143", "internal": f"{LOOPBACK}:1"})
    try:
        result = api.post("/api/v1/mappings/imap.check.example:143/check").json()
        assert result["reachable"] is True and result["protocol_seen"] == "IMAP"
        assert result["summary"].startswith(f"reachable (IMAP greeting from {dovecot.host}:{dovecot.imap_port}")
        down = api.post("/api/v1/mappings/down.check.example:143/check").json()
        assert down["reachable"] is False
        assert down["summary"] == f"not reachable: connection refused by {LOOPBACK}:1"
        everything = {r["virtual"]: r for r in api.post("/api/v1/mappings/check").json()}
        assert everything["imap.check.example:143"]["reachable"] is True
        assert everything["down.check.example:143"]["reachable"] is False
        unknown = api.post("/api/v1/mappings/nothing.check.example:143/check")
        assert unknown.status_code == 404 and "no mapping for virtual host" in unknown.json()["error"]
        page = api.post(
            "/mappings/check",
            data={"csrf_token": api.headers["X-CSRF-Token"], "virtual": "imap.check.example:143"},
            headers={"X-CSRF-Token": ""},
        )
        assert page.status_code == 200 and "Reachable" in page.text and "IMAP greeting" in page.text
    finally:
        api.delete("/api/v1/mappings/imap.check.example:143")
        api.delete("/api/v1/mappings/down.check.example:143")


# -- trust store ----------------------------------------------------------------------------------------------------


def test_truststore_upload_list_and_remove(ui: Ui, api: httpx.Client, dovecot: Dovecot) -> None:
    store = ui.state_dir / "truststore"
    pem = dovecot.pki.root_pem.read_bytes()
    added = api.post("/api/v1/truststore", files={"certificate": ("root.pem", pem)}, data={"alias": "web-root"})
    assert added.status_code == 201, added.text
    assert added.json()["added"][0]["alias"] == "web-root"
    listed = {entry["alias"]: entry for entry in api.get("/api/v1/truststore").json()}
    assert listed["web-root"]["warning"] is None and listed["web-root"]["days_left"] > 30
    files = sorted(path.name for path in store.iterdir())

    again = api.post("/api/v1/truststore", files={"certificate": ("root.pem", pem)})
    assert again.status_code == 409 and "already in the trust store as 'web-root'" in again.json()["error"]
    garbage = api.post("/api/v1/truststore", files={"certificate": ("notes.txt", b"this is not a certificate\n")})
    assert garbage.status_code == 400, garbage.text
    assert "notes.txt" in garbage.json()["error"] and garbage.json()["hint"]
    oversized = api.post("/api/v1/truststore", files={"certificate": ("big.pem", pem + b"#" * MIB)})
    assert oversized.status_code == 413
    assert "at most 1048576 bytes (1 MiB)" in oversized.json()["error"]
    leaf = api.post("/api/v1/truststore", files={"certificate": ("leaf.pem", dovecot.pki.leaf_pem.read_bytes())})
    assert leaf.status_code == 400 and "cannot be a trust anchor" in leaf.json()["error"]
    bad_alias = api.post("/api/v1/truststore", files={"certificate": ("r.pem", pem)}, data={"alias": "../x"})
    assert bad_alias.status_code == 422
    assert sorted(path.name for path in store.iterdir()) == files  # nothing half-saved

    page = api.get("/truststore")
    assert page.status_code == 200 and "web-root" in page.text
    removed = api.delete("/api/v1/truststore/web-root")
    assert removed.status_code == 200 and removed.json()["removed"]["alias"] == "web-root"
    assert api.delete("/api/v1/truststore/web-root").status_code == 404
    trust_audit = [r["action"] for r in ui.audit() if r.get("action", "").startswith("truststore-")]
    assert trust_audit[-2:] == ["truststore-add", "truststore-remove"]


def test_truststore_upload_form_errors(ui: Ui, api: httpx.Client) -> None:
    page = api.post(
        "/truststore",
        files={"certificate": ("empty.pem", b"")},
        data={"csrf_token": api.headers["X-CSRF-Token"], "alias": "kept-alias"},
        headers={"X-CSRF-Token": ""},
    )
    assert page.status_code == 400 and 'role="alert"' in page.text and 'value="kept-alias"' in page.text


# -- audit log, monitoring, settings --------------------------------------------------------------------------------


def test_audit_filters_pages_and_csv(ui: Ui, api: httpx.Client, dovecot: Dovecot) -> None:
    api.post(
        "/api/v1/mappings",
        json={"virtual": "audit.corp.example:143", "internal": f"{dovecot.host}:{dovecot.imap_port}"},
    )
    try:
        assert socks(ui, "audit.corp.example", 143) == 0x00
        assert socks(ui, "unmapped.audit.example", 143) == 0x02
        assert socks(ui, "unmapped.audit.example", 143) == 0x02
        denied = api.get("/api/v1/audit", params={"kind": "denied", "mapping": "unmapped.audit.example:143"}).json()
        assert denied["total"] == 2
        assert {r["event"] for r in denied["records"]} == {"access-denied"}
        assert denied["records"][0]["reason"] == "no mapping"
        allowed = api.get("/api/v1/audit", params={"kind": "allowed", "mapping": "audit.corp.example:143"}).json()
        assert allowed["total"] == 1
        assert allowed["records"][0]["internal"] == f"{dovecot.host}:{dovecot.imap_port}"
        config = api.get("/api/v1/audit", params={"kind": "config", "mapping": "audit.corp.example:143"}).json()
        assert [r["action"] for r in config["records"]] == ["mapping-add"]

        everything = api.get("/api/v1/audit", params={"limit": 500}).json()
        times = [r["time"] for r in everything["records"]]
        assert times == sorted(times, reverse=True)  # newest first
        first = api.get("/api/v1/audit", params={"limit": 1}).json()
        second = api.get("/api/v1/audit", params={"limit": 1, "offset": 1}).json()
        assert first["records"] == everything["records"][:1] and second["records"] == everything["records"][1:2]
        assert first["total"] == everything["total"]

        future = api.get("/api/v1/audit", params={"since": "2999-01-01"}).json()
        assert future["total"] == 0
        window = api.get("/api/v1/audit", params={"since": "2000-01-01T00:00", "until": "2999-01-01T00:00Z"}).json()
        assert window["total"] == everything["total"]
        backwards = api.get("/api/v1/audit", params={"since": "2024-05-02", "until": "2024-05-01"})
        assert backwards.status_code == 422 and "before it starts" in backwards.json()["error"]
        assert api.get("/api/v1/audit", params={"kind": "sideways"}).status_code == 422
        assert api.get("/api/v1/audit", params={"since": "yesterday"}).status_code == 422

        exported = api.get("/api/v1/audit.csv", params={"kind": "denied", "mapping": "unmapped.audit.example:143"})
        assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        assert len(rows) == 2
        assert {row["event"] for row in rows} == {"access-denied"}
        assert rows[0]["virtual"] == "unmapped.audit.example:143" and rows[0]["trace_id"]
        page_csv = api.get("/audit.csv", params={"kind": "denied"})
        assert page_csv.status_code == 200 and page_csv.text.startswith("time,event,")

        page = api.get("/audit", params={"kind": "denied", "mapping": "unmapped.audit.example:143"})
        assert page.status_code == 200 and page.text.count("Access Denied</span>") == 2
        bad_page = api.get("/audit", params={"since": "nonsense"})
        assert bad_page.status_code == 422 and 'role="alert"' in bad_page.text
    finally:
        api.delete("/api/v1/mappings/audit.corp.example:143")


def test_monitoring_counts_connections_bytes_and_errors(ui: Ui, api: httpx.Client, dovecot: Dovecot) -> None:
    virtual = "mon.corp.example:143"
    api.post("/api/v1/mappings", json={"virtual": virtual, "internal": f"{dovecot.host}:{dovecot.imap_port}"})
    api.post("/api/v1/mappings", json={"virtual": "mon-down.corp.example:143", "internal": f"{LOOPBACK}:1"})
    try:
        reply, sock = socks_connect(ui.stack.socks_port, "mon.corp.example", 143, "acme/dc1", ui.stack.secret)
        assert reply == 0
        greeting = sock.recv(4096)
        assert greeting.startswith(b"* OK")
        host = _host(api, virtual)
        assert host["active"] == 1 and host["total"] == 1 and host["mapped"] is True
        sock.sendall(b"a LOGOUT\r\n")
        while sock.recv(4096):
            pass
        sock.close()
        host = _wait_host(api, virtual, lambda h: h["active"] == 0)
        assert host["total"] == 1
        assert host["bytes_in"] == len(b"a LOGOUT\r\n")
        assert host["bytes_out"] >= len(greeting) + len(b"* BYE")

        assert socks(ui, "mon-down.corp.example", 143) != 0
        assert socks(ui, "mon-unmapped.corp.example", 143) == 0x02
        stats = api.get("/api/v1/monitoring").json()
        hosts = {h["virtual"]: h for h in stats["hosts"]}
        assert hosts["mon-down.corp.example:143"]["failed"] == 1
        assert "connection refused" in hosts["mon-down.corp.example:143"]["recent_errors"][0]["message"]
        assert hosts["mon-unmapped.corp.example:143"]["denied"] == 1
        assert hosts["mon-unmapped.corp.example:143"]["mapped"] is False
        assert stats["recent_errors"][0]["virtual"] == "mon-unmapped.corp.example:143"
        page = api.get("/monitoring")
        assert page.status_code == 200 and "mon.corp.example:143" in page.text
    finally:
        api.delete(f"/api/v1/mappings/{virtual}")
        api.delete("/api/v1/mappings/mon-down.corp.example:143")


def _host(api: httpx.Client, virtual: str) -> dict[str, Any]:
    hosts = {h["virtual"]: h for h in api.get("/api/v1/monitoring").json()["hosts"]}
    return hosts[virtual]


def _wait_host(api: httpx.Client, virtual: str, condition: Any, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        host = _host(api, virtual)
        if condition(host) or time.monotonic() > deadline:
            return host
        time.sleep(0.05)


def test_log_level_switch_changes_the_running_process(ui: Ui, api: httpx.Client) -> None:
    assert ui.connector.process is not None
    assert api.get("/api/v1/settings").json()["log_level"] == "debug"  # the harness starts with --log-level debug
    bad = api.put("/api/v1/settings/log-level", json={"level": "loud"})
    assert bad.status_code == 422 and "unknown log level 'loud'" in bad.json()["error"]
    try:
        assert api.put("/api/v1/settings/log-level", json={"level": "error"}).json() == {"log_level": "error"}
        assert socks(ui, "quiet.level.example", 143) == 0x02
        assert api.put("/api/v1/settings/log-level", json={"level": "info"}).json() == {"log_level": "info"}
        assert socks(ui, "loud.level.example", 143) == 0x02
        log = _wait_log(ui.connector, "loud.level.example")
        assert "quiet.level.example" not in log  # its warning was dropped at level error
        changes = [r["detail"] for r in ui.audit() if r.get("action") == "trace-level"]
        assert changes[-2:] == [{"from": "debug", "to": "error"}, {"from": "error", "to": "info"}]
        page = api.get("/settings")
        assert page.status_code == 200 and '<option value="info" selected>' in page.text
    finally:
        api.put("/api/v1/settings/log-level", json={"level": "debug"})


def _wait_log(connector: Connector, text: str, timeout: float = 10) -> str:
    assert connector.process is not None
    deadline = time.monotonic() + timeout
    while text not in connector.process.log():
        assert time.monotonic() < deadline, f"'{text}' not in the connector log"
        time.sleep(0.05)
    return connector.process.log()


def test_every_page_renders_and_openapi_lists_the_actions(ui: Ui, api: httpx.Client) -> None:
    for path, heading in [
        ("/", "<h1>Overview</h1>"),
        ("/mappings", "<h1>Mappings</h1>"),
        ("/truststore", "<h1>Backend trust store</h1>"),
        ("/audit", "<h1>Audit log</h1>"),
        ("/monitoring", "<h1>Monitoring</h1>"),
        ("/settings", "<h1>Settings</h1>"),
    ]:
        page = api.get(path)
        assert page.status_code == 200 and heading in page.text, path
        assert page.headers["x-frame-options"] == "DENY"
    with httpx.Client(base_url=ui.url) as anonymous:
        document = anonymous.get("/api/openapi.json").json()
    paths = document["paths"]
    for path, method in [
        ("/api/v1/mappings", "post"),
        ("/api/v1/mappings/{virtual}", "patch"),
        ("/api/v1/mappings/{virtual}", "delete"),
        ("/api/v1/mappings/{virtual}/enable", "post"),
        ("/api/v1/mappings/{virtual}/disable", "post"),
        ("/api/v1/mappings/{virtual}/check", "post"),
        ("/api/v1/mappings/check", "post"),
        ("/api/v1/truststore", "post"),
        ("/api/v1/truststore/{alias}", "delete"),
        ("/api/v1/audit", "get"),
        ("/api/v1/audit.csv", "get"),
        ("/api/v1/monitoring", "get"),
        ("/api/v1/settings/log-level", "put"),
        ("/api/v1/status", "get"),
        ("/api/v1/login", "post"),
    ]:
        assert method in paths.get(path, {}), (path, method)


def test_https_with_the_connector_certificate(ui: Ui) -> None:
    third = ui.stack.enroll("dc3", name="third")
    cli(third.home, "connector", "admin", "set-password", "--password-stdin", stdin=PASSWORD + "\n")
    port = free_port()
    process = ui.stack.start_connector(third, "--ui-listen", f"{LOOPBACK}:{port}", "--ui-tls")
    try:
        wait_for_port(port, alive=process.alive)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{LOOPBACK}:{port}/healthz", timeout=5)  # no plain HTTP next to it
        # the connector's certificate is made for TLS client authentication and names the connector, not an
        # address: a browser warns about it. What matters here: it is that certificate, and the session is Secure.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection((LOOPBACK, port), timeout=10) as raw, context.wrap_socket(raw) as tls:
            presented = tls.getpeercert(binary_form=True)
        own = x509.load_pem_x509_certificate((third.home / "connector" / "client.pem").read_bytes())
        assert presented == own.public_bytes(serialization.Encoding.DER)
        with httpx.Client(base_url=f"https://{LOOPBACK}:{port}", verify=context, timeout=10) as client:
            assert client.get("/healthz").json() == {"status": "ok"}
            login = client.post("/api/v1/login", json={"password": PASSWORD})
            assert login.status_code == 200 and "secure" in login.headers["set-cookie"].lower()
            assert client.get("/api/v1/status").json()["connector_id"] == third.identity["connector_id"]
    finally:
        process.stop()


def test_https_with_the_operators_certificate_which_clients_can_verify(ui: Ui, test_pki: TestPki) -> None:
    fourth = ui.stack.enroll("dc4", name="fourth")
    cli(fourth.home, "connector", "admin", "set-password", "--password-stdin", stdin=PASSWORD + "\n")
    port = free_port()
    process = ui.stack.start_connector(
        fourth, "--ui-listen", f"{LOOPBACK}:{port}", "--ui-cert", str(test_pki.chain_pem), "--ui-key",
        str(test_pki.key_pem),
    )  # fmt: skip
    try:
        wait_for_port(port, alive=process.alive)
        # verified like a browser that trusts the company CA: chain and host name (127.0.0.1 is in the SANs)
        with httpx.Client(base_url=f"https://{LOOPBACK}:{port}", verify=test_pki.client_context(), timeout=10) as web:
            assert web.get("/healthz").json() == {"status": "ok"}
            assert web.post("/api/v1/login", json={"password": PASSWORD}).status_code == 200
            assert web.get("/api/v1/status").json()["connector_id"] == fourth.identity["connector_id"]
    finally:
        process.stop()
    home = fourth.home
    broken = home / "broken.pem"
    broken.write_text("not a certificate\n")
    refused = cli(home, "connector", "run", "--ui-listen", f"{LOOPBACK}:{free_port()}", "--ui-cert", str(broken),
                  check=False, timeout=30)  # fmt: skip
    assert refused.returncode == 2 and f"cannot serve the UI over HTTPS with '{broken}'" in refused.stderr
    plain = cli(home, "connector", "run", "--ui-listen", f"{LOOPBACK}:{free_port()}", "--ui-cert",
                str(test_pki.chain_pem), "--ui-no-tls", check=False, timeout=30)  # fmt: skip
    assert plain.returncode == 2 and "--ui-cert needs HTTPS" in plain.stderr
    lonely = cli(home, "connector", "run", "--ui-key", str(test_pki.key_pem), check=False, timeout=30)
    assert lonely.returncode == 2 and "--ui-key belongs to --ui-cert" in lonely.stderr


def test_plain_http_off_loopback_is_refused_before_listening(ui: Ui) -> None:
    refused = cli(
        ui.connector.home, "connector", "run", "--ui-listen", "192.0.2.10:8444", "--ui-no-tls", check=False, timeout=30
    )
    assert refused.returncode == 2
    assert "refusing to serve the connector UI over plain HTTP on '192.0.2.10:8444'" in refused.stderr
    taken = cli(ui.connector.home, "connector", "run", "--ui-listen", ui.url.removeprefix("http://"), check=False)
    assert taken.returncode == 2 and "cannot listen there" in taken.stderr


@pytest.mark.parametrize("app", ["connector", "cloud"])
def test_admin_set_password_without_a_password_says_how_to_give_one(tmp_path: Path, app: str) -> None:
    empty = cli(tmp_path, app, "admin", "set-password", "--password-stdin", stdin="", check=False)
    assert empty.returncode == 2 and "no password on stdin" in empty.stderr
    no_terminal = cli(tmp_path, app, "admin", "set-password", stdin="", check=False)
    assert no_terminal.returncode == 2 and "cannot prompt for the new" in no_terminal.stderr
    assert "--password-stdin" in no_terminal.stderr
