"""The cloud cockpit's JSON API (and its form pages) against a REAL hub process with a real connector, the real
Dovecot behind it, and a flows runtime's state written by `postbridge run --once`.

One hub serves the whole module (starting one costs a second or two); every test sets up the state it depends on
(the keystore above all) itself, so the tests pass in any order.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from postbridge.trust.truststore import TrustStore
from tests.harness import Connector, Stack, cli
from tests.runtime_lab import SERVER_NAME, fill_folder
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPki

pytestmark = pytest.mark.e2e

PASSWORD = "cockpit-admin-pass"
VAULT_SECRET = "Zq8-unmistakable-vault-passphrase"
API = "/api/v1/cockpit"
VIRTUAL = "mail.corp.example:143"


class Cockpit:
    """An API client of the hub's cockpit that remembers every response body (to look for leaked secrets)."""

    def __init__(self, stack: Stack) -> None:
        self.bodies: list[str] = []
        self.csrf = ""
        self.http = httpx.Client(
            base_url=stack.api_url,
            verify=stack.ca_context(),
            timeout=60,
            event_hooks={"response": [self._keep]},
        )

    def __enter__(self) -> Cockpit:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.http.close()

    def _keep(self, response: httpx.Response) -> None:
        response.read()
        self.bodies.append(response.text)

    def login(self, password: str = PASSWORD) -> httpx.Response:
        response = self.http.post("/api/v1/login", json={"password": password})
        if response.status_code == 200:
            self.csrf = response.json()["csrf_token"]
        return response

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.http.get(path, params=params)

    def post(self, path: str, body: Any = None, *, csrf: bool = True) -> httpx.Response:
        headers = {"X-CSRF-Token": self.csrf} if csrf else {}
        return self.http.post(path, json=body, headers=headers)

    def delete(self, path: str) -> httpx.Response:
        return self.http.delete(path, headers={"X-CSRF-Token": self.csrf})

    def form(self, path: str, fields: dict[str, str], files: dict[str, Any] | None = None) -> httpx.Response:
        """A page's form POST, as a browser sends it (the CSRF token as a form field)."""
        return self.http.post(path, data={"csrf_token": self.csrf, **fields}, files=files)

    def ok(self, response: httpx.Response, status: int = 200) -> Any:
        assert response.status_code == status, f"{response.request.method} {response.request.url}: {response.text}"
        return response.json()

    def empty_keystore(self) -> None:
        for entry in self.ok(self.get(f"{API}/keystore")):
            self.ok(self.delete(f"{API}/keystore/{entry['alias']}"))


@dataclass
class Lab:
    stack: Stack
    connector: Connector
    flows: Path
    folder: str
    message_ids: list[str]
    runtime_home: Path

    @property
    def home(self) -> Path:
        return self.stack.cloud_home


def _flows_file(path: Path, dovecot: Dovecot, keystore: Path, folder: str, state: Path, out: Path) -> Path:
    def flow(name: str, mailbox: str) -> str:
        return f"""
[[flow]]
name = "{name}"
protocol = "imap"
interval = 0.2
stale_after = 3600

[flow.sender]
address = "{dovecot.host}:{dovecot.imap_port}"
protection = "starttls-mandatory"
tls_server_name = "{SERVER_NAME}"
keystore = "{keystore}"
user = "alice"
password = "secret"
folder = "{mailbox}"
post_processing = "archive"
archive_folder = "{folder}-done"
timeout = 10

[flow.retry]
max_attempts = 3
initial = 0.2
maximum = 1

[flow.target]
kind = "directory"
path = "{out}"
"""

    path.write_text(
        f'[runtime]\nstate = "sqlite:///{state}"\nmetrics = ""\n'
        + flow("drain", folder)
        + flow("broken", f"{folder}-does-not-exist")
    )
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, dovecot: Dovecot, test_pki: TestPki) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("cockpit")
    stack = Stack(root).init()
    cli(stack.cloud_home, "cloud", "admin", "set-password", "--password-stdin", stdin=PASSWORD + "\n")
    cli(stack.cloud_home, "credentials", "add", "alice-mail", "--user", "alice", "--password-stdin", stdin="secret\n")
    cli(stack.cloud_home, "credentials", "add", "vault-entry", "--user", "carol", "--password-stdin",
        stdin=VAULT_SECRET + "\n")  # fmt: skip
    runtime_keystore = TrustStore(root / "runtime-keystore")
    runtime_keystore.add(test_pki.root_pem.read_bytes(), alias="test-root")
    folder, ids = fill_folder(dovecot, runtime_keystore.directory, 6, tag="cockpit")
    flows = _flows_file(
        root / "flows.toml", dovecot, runtime_keystore.directory, folder, root / "state.db", root / "out"
    )
    stack.start_hub("--flows", str(flows))
    try:
        connector = stack.enroll("dc1")
        stack.map(connector, VIRTUAL, f"{dovecot.host}:{dovecot.imap_port}", "--description", "corp IMAP")
        stack.start_connector(connector)
        yield Lab(stack, connector, flows, folder, ids, root / "runtime-home")
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def cockpit(lab: Lab) -> Iterator[Cockpit]:
    with Cockpit(lab.stack) as client:
        client.ok(client.login())
        yield client


@pytest.fixture
def anonymous(lab: Lab) -> Iterator[Cockpit]:
    """A client of the module's hub that has not logged in."""
    with Cockpit(lab.stack) as client:
        yield client


def test_login_is_required_csrf_is_checked_and_the_hub_api_is_unchanged(lab: Lab, anonymous: Cockpit) -> None:
    refused = anonymous.get(f"{API}/subaccounts")
    assert refused.status_code == 401 and refused.json()["error"]
    page = anonymous.get("/cockpit/subaccounts")
    assert page.status_code == 303 and page.headers["location"].startswith("/login?next=")
    assert anonymous.login("not-the-password").status_code == 401
    assert anonymous.login().status_code == 200
    before = anonymous.ok(anonymous.get(f"{API}/tokens"))
    no_csrf = anonymous.post(f"{API}/tokens", {"subaccount": "acme", "location": "dc9"}, csrf=False)
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.json()["error"]
    wrong_csrf = anonymous.http.post(f"{API}/tokens", json={"subaccount": "acme"}, headers={"X-CSRF-Token": "x" * 43})
    assert wrong_csrf.status_code == 403
    form_without_token = anonymous.http.post("/cockpit/tokens", data={"subaccount": "acme", "location": "dc9"})
    assert form_without_token.status_code == 403
    assert anonymous.ok(anonymous.get(f"{API}/tokens")) == before  # nothing was created
    # the hub's own API answers as before, next to the cockpit
    assert lab.stack.token()
    health = httpx.get(f"{lab.stack.api_url}/healthz", verify=lab.stack.ca_context()).json()
    assert health["status"] == "ok" and health["connectors"] >= 1
    schema = anonymous.ok(anonymous.get("/api/openapi.json"))
    assert f"{API}/connection-test" in schema["paths"] and f"{API}/flows" in schema["paths"]


def test_subaccounts_list_connected_connectors_with_their_mappings(lab: Lab, cockpit: Cockpit) -> None:
    connector_id = lab.connector.identity["connector_id"]
    subaccounts = {item["name"]: item for item in cockpit.ok(cockpit.get(f"{API}/subaccounts"))}
    (connector,) = [c for c in subaccounts["acme"]["connectors"] if c["connector_id"] == connector_id]
    assert connector["location"] == "dc1" and connector["certificate_serial"]
    (mapping,) = [m for m in connector["mappings"] if m["virtual"] == VIRTUAL]
    assert mapping["protocol"] == "tcp" and mapping["description"] == "corp IMAP" and mapping["enabled"] is True
    created = cockpit.ok(cockpit.post(f"{API}/subaccounts", {"name": "globex"}), 201)
    assert created["client_id"] == "globex" and len(created["client_secret"]) >= 40
    listed = cockpit.get(f"{API}/subaccounts")
    assert "globex" in {item["name"] for item in listed.json()} and created["client_secret"] not in listed.text
    assert cockpit.post(f"{API}/subaccounts", {"name": "globex"}).status_code == 409
    bad = cockpit.post(f"{API}/subaccounts", {"name": "no spaces"})
    assert bad.status_code == 422 and "not valid" in bad.json()["error"]
    from_cli = json.loads(cli(lab.home, "cloud", "subaccount", "list", "--json").stdout)
    assert {row["subaccount"] for row in from_cli} >= {"acme", "globex"}  # one implementation behind both
    page = cockpit.get("/cockpit/subaccounts")
    assert page.status_code == 200 and connector_id in page.text and VIRTUAL in page.text
    added = cockpit.form("/cockpit/subaccounts", {"name": "initech"})
    assert added.status_code == 200 and "initech" in added.text and "not shown again" in added.text
    duplicate = cockpit.form("/cockpit/subaccounts", {"name": "initech"})
    assert duplicate.status_code == 409 and 'role="alert"' in duplicate.text and 'value="initech"' in duplicate.text


def test_enrollment_tokens_are_created_listed_and_revoked(lab: Lab, cockpit: Cockpit) -> None:
    created = cockpit.ok(
        cockpit.post(f"{API}/tokens", {"subaccount": "acme", "location": "dc7", "ttl_minutes": 30}), 201
    )
    assert created["token"].startswith("pbe1.") and created["expires_at"] == pytest.approx(time.time() + 1800, abs=60)
    listing = cockpit.get(f"{API}/tokens")
    (row,) = [t for t in listing.json() if t["token_id"] == created["token_id"]]
    assert row["status"] == "unused" and row["location"] == "dc7" and created["token"] not in listing.text
    revoked = cockpit.ok(cockpit.post(f"{API}/tokens/{created['token_id']}/revoke"))
    assert revoked["status"] == "revoked" and revoked["revoked"] is True
    tunnel = f"127.0.0.1:{lab.stack.tunnel_port}"
    refused = cli(lab.stack.root / "revoked-token", "connector", "enroll", "--cloud", tunnel,
                  "--token", created["token"], check=False)  # fmt: skip
    assert refused.returncode == 1 and "expired" in refused.stderr
    fresh = cockpit.ok(cockpit.post(f"{API}/tokens", {"subaccount": "acme", "location": "dc7"}), 201)
    cli(lab.stack.root / "fresh-token", "connector", "enroll", "--cloud", tunnel, "--token", fresh["token"])
    states = {t["token_id"]: t["status"] for t in cockpit.ok(cockpit.get(f"{API}/tokens"))}
    assert states[fresh["token_id"]] == "used" and states[created["token_id"]] == "revoked"
    assert cockpit.post(f"{API}/tokens/{fresh['token_id']}/revoke").status_code == 409
    assert cockpit.post(f"{API}/tokens/0123456789abcdef/revoke").status_code == 404
    assert cockpit.post(f"{API}/tokens", {"subaccount": "nobody", "location": "x"}).status_code == 404
    too_long = cockpit.post(f"{API}/tokens", {"subaccount": "acme", "ttl_minutes": 99999})
    assert too_long.status_code == 422 and "7 days" in too_long.json()["error"]
    from_cli = json.loads(cli(lab.home, "cloud", "enroll", "acme", "--location", "dc8", "--json").stdout)
    assert from_cli["token"] not in cockpit.get(f"{API}/tokens").text
    page = cockpit.form("/cockpit/tokens", {"subaccount": "acme", "location": "dc9", "ttl_minutes": "5"})
    assert page.status_code == 200 and "pbe1." in page.text and "shown only now" in page.text
    token_id = re.search(r"Token ([0-9a-f]{16}) created", page.text)
    assert token_id is not None
    revoke_page = cockpit.form(f"/cockpit/tokens/{token_id.group(1)}/revoke", {})
    assert revoke_page.status_code == 303
    assert {t["token_id"]: t["status"] for t in cockpit.ok(cockpit.get(f"{API}/tokens"))}[
        token_id.group(1)
    ] == "revoked"


def test_revoking_a_certificate_drops_the_connector_and_refuses_it(lab: Lab, cockpit: Cockpit) -> None:
    victim = lab.stack.enroll("dc2", name="to-be-revoked")
    lab.stack.start_connector(victim)
    victim_id = victim.identity["connector_id"]
    (cert,) = [c for c in cockpit.ok(cockpit.get(f"{API}/certificates")) if c["connector_id"] == victim_id]
    assert cert["connected"] is True and cert["revoked"] is False and cert["location"] == "dc2"
    revoked = cockpit.ok(cockpit.post(f"{API}/certificates/{cert['serial']}/revoke"))
    assert revoked["revoked"] is True and revoked["revoked_at"]
    lab.stack.wait_connected(victim_id, gone=True, timeout=10)
    time.sleep(3)  # the connector keeps trying (backoff from 0.5 s): it must stay out
    assert victim_id not in {c["connector_id"] for c in lab.stack.connected()}
    assert lab.stack.hub is not None and f"certificate {cert['serial']} of connector {victim_id} is revoked" in (
        lab.stack.hub.log()
    )
    (after,) = [c for c in cockpit.ok(cockpit.get(f"{API}/certificates")) if c["serial"] == cert["serial"]]
    assert after["revoked"] is True and after["connected"] is False
    others = {c["connector_id"] for c in lab.stack.connected()}
    assert lab.connector.identity["connector_id"] in others  # only the revoked one was dropped
    assert cockpit.post(f"{API}/certificates/{cert['serial']}/revoke").status_code == 200  # idempotent
    assert cockpit.post(f"{API}/certificates/ffff0000/revoke").status_code == 404
    assert cockpit.post(f"{API}/certificates/not-hex/revoke").status_code == 422
    if victim.process:
        victim.process.stop()


def test_keystore_upload_list_remove_and_bad_input(lab: Lab, cockpit: Cockpit, test_pki: TestPki) -> None:
    cockpit.empty_keystore()
    root_pem = test_pki.root_pem.read_text()
    added = cockpit.ok(cockpit.post(f"{API}/keystore", {"certificate": root_pem, "alias": "corp-root"}), 201)
    assert [entry["alias"] for entry in added] == ["corp-root"] and added[0]["is_ca"] is True
    listed = cockpit.ok(cockpit.get(f"{API}/keystore"))
    assert [(e["alias"], e["fingerprint"]) for e in listed] == [("corp-root", added[0]["fingerprint"])]
    assert cockpit.post(f"{API}/keystore", {"certificate": root_pem}).status_code == 409  # already trusted
    unreadable = cockpit.post(f"{API}/keystore", {"certificate": "-----BEGIN CERTIFICATE-----\nnope\n"})
    assert unreadable.status_code == 400 and unreadable.json()["hint"]
    leaf = cockpit.post(f"{API}/keystore", {"certificate": test_pki.leaf_pem.read_text()})
    assert leaf.status_code == 400 and "cannot be a trust anchor" in leaf.json()["error"]
    oversized = cockpit.post(f"{API}/keystore", {"certificate": root_pem + "#" * (1024 * 1024)})
    assert oversized.status_code == 413 and "limit" in oversized.json()["error"]
    assert len(cockpit.ok(cockpit.get(f"{API}/keystore"))) == 1  # nothing half-saved
    assert cockpit.ok(cockpit.delete(f"{API}/keystore/corp-root"))["alias"] == "corp-root"
    assert cockpit.ok(cockpit.get(f"{API}/keystore")) == []
    assert cockpit.delete(f"{API}/keystore/corp-root").status_code == 404
    uploaded = cockpit.form(
        "/cockpit/keystore", {"alias": "from-page"}, files={"file": ("root.pem", root_pem.encode())}
    )
    assert uploaded.status_code == 303
    assert [e["alias"] for e in cockpit.ok(cockpit.get(f"{API}/keystore"))] == ["from-page"]
    bad_page = cockpit.form("/cockpit/keystore", {"alias": "junk"}, files={"file": ("junk.pem", b"not a cert")})
    assert bad_page.status_code == 400 and 'role="alert"' in bad_page.text and "junk.pem" in bad_page.text
    assert 'value="junk"' in bad_page.text  # the input is kept
    removed = cockpit.form("/cockpit/keystore/from-page/remove", {})
    assert removed.status_code == 303 and cockpit.ok(cockpit.get(f"{API}/keystore")) == []
    on_disk = TrustStore(lab.home / "keystore").list()  # the same store the CLI's 'postbridge keystore' manages
    assert on_disk == []


def test_credentials_show_names_never_secrets(lab: Lab, cockpit: Cockpit) -> None:
    start = len(cockpit.bodies)
    names = {e["name"]: e for e in cockpit.ok(cockpit.get(f"{API}/credentials"))}
    assert names["vault-entry"]["kind"] == "password" and names["vault-entry"]["user"] == "carol"
    assert set(names["vault-entry"]) == {"name", "kind", "user", "created", "updated"}
    page = cockpit.get("/cockpit/credentials")
    assert page.status_code == 200 and "vault-entry" in page.text and "carol" in page.text
    test_page = cockpit.get("/cockpit/test")
    assert "vault-entry" in test_page.text  # offered by name in the connection test form
    tested = cockpit.post(f"{API}/connection-test", {"kind": "imap", "address": "127.0.0.1:9", "protection": "off",
                          "credential": "vault-entry", "check_auth": True, "timeout": 2})  # fmt: skip
    assert tested.status_code == 200 and tested.json()["ok"] is False
    unknown = cockpit.post(f"{API}/connection-test", {"address": "127.0.0.1:9", "credential": "nope"})
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
    assert len(cockpit.bodies) - start >= 5
    for body in cockpit.bodies:  # every answer this module got so far, not only this test's
        assert VAULT_SECRET not in body
        assert lab.stack.secret not in body


def _imap_test(**extra: Any) -> dict[str, Any]:
    return {
        "kind": "imap", "address": VIRTUAL, "proxy": "on-premise", "subaccount": "acme", "location_id": "dc1",
        "protection": "starttls-mandatory", "credential": "alice-mail", "check_auth": True, **extra,
    }  # fmt: skip


def test_connection_test_through_the_hub_passes_and_logs_in(cockpit: Cockpit, test_pki: TestPki) -> None:
    cockpit.empty_keystore()
    cockpit.ok(cockpit.post(f"{API}/keystore", {"certificate": test_pki.root_pem.read_text()}), 201)
    report = cockpit.ok(cockpit.post(f"{API}/connection-test", _imap_test()))
    steps = {step["name"]: step for step in report["steps"]}
    assert report["ok"] is True, json.dumps(report, indent=1)
    assert "SOCKS5 via the hub" in steps["connection"]["detail"] and "dc1" in steps["connection"]["detail"]
    assert steps["STARTTLS"]["ok"] and steps["login"]["ok"] and "alice" in steps["login"]["detail"]
    assert report["chain"]["trusted"] is True and report["anchor_candidates"] == []
    assert [c["role"] for c in report["chain"]["certificates"]][:2] == ["server", "intermediate"]
    page = cockpit.form("/cockpit/test", {k: str(v) for k, v in _imap_test(check_auth="on").items()})
    assert page.status_code == 200 and "all " in page.text and "steps passed" in page.text
    assert "Certificate chain" in page.text
    unmapped = cockpit.ok(cockpit.post(f"{API}/connection-test", _imap_test(address="other.corp.example:143")))
    assert unmapped["ok"] is False and "0x02" in unmapped["steps"][0]["cause"]
    assert any(VIRTUAL in line for line in unmapped["steps"][0]["evidence"])  # the hub listed the mappings
    bad = cockpit.post(f"{API}/connection-test", _imap_test(address="no-port"))
    assert bad.status_code == 422 and "no port" in bad.json()["error"]
    bad_page = cockpit.form("/cockpit/test", {"address": "no-port", "kind": "imap"})
    assert bad_page.status_code == 422 and 'role="alert"' in bad_page.text and 'value="no-port"' in bad_page.text


def test_unknown_ca_then_add_to_keystore_makes_the_test_pass(cockpit: Cockpit, test_pki: TestPki) -> None:
    cockpit.empty_keystore()
    failed = cockpit.ok(cockpit.post(f"{API}/connection-test", _imap_test()))
    assert failed["ok"] is False and failed["chain"]["problem"] in ("unknown-ca", "issuer-missing")
    (candidate,) = failed["anchor_candidates"]
    assert candidate["role"] == "intermediate" and candidate["sha256"].count(":") == 31
    preview = cockpit.ok(cockpit.post(f"{API}/connection-test/add-to-keystore", _imap_test()))
    assert preview["confirm_needed"] is True and preview["added"] == []
    assert preview["report"]["anchor_candidates"][0]["sha256"] == candidate["sha256"]
    assert cockpit.ok(cockpit.get(f"{API}/keystore")) == []  # a preview changes nothing
    other = "AB:" * 31 + "AB"
    mismatch = cockpit.post(f"{API}/connection-test/add-to-keystore", _imap_test(fingerprint=other, confirm=True))
    assert mismatch.status_code == 409 and candidate["sha256"] in mismatch.json()["error"]
    assert cockpit.ok(cockpit.get(f"{API}/keystore")) == []
    added = cockpit.ok(cockpit.post(f"{API}/connection-test/add-to-keystore",
                                    _imap_test(fingerprint=candidate["sha256"], confirm=True)))  # fmt: skip
    assert [entry["fingerprint"] for entry in added["added"]] == [candidate["sha256"]]
    assert added["report"]["ok"] is True and added["report"]["chain"]["trusted"] is True
    again = cockpit.post(f"{API}/connection-test/add-to-keystore",
                         _imap_test(fingerprint=candidate["sha256"], confirm=True))  # fmt: skip
    assert again.status_code == 409 and "already trusted" in again.json()["error"]
    # the same two steps through the pages
    cockpit.empty_keystore()
    fields = {k: str(v) for k, v in _imap_test().items()}
    report_page = cockpit.form("/cockpit/test", fields)
    assert "Add to keystore" in report_page.text and candidate["sha256"] in report_page.text
    confirm_page = cockpit.form("/cockpit/test/add-to-keystore", {**fields, "fingerprint": candidate["sha256"]})
    assert confirm_page.status_code == 200 and "Yes, trust this certificate" in confirm_page.text
    assert cockpit.ok(cockpit.get(f"{API}/keystore")) == []
    done = cockpit.form(
        "/cockpit/test/add-to-keystore", {**fields, "fingerprint": candidate["sha256"], "confirm": "yes"}
    )
    assert done.status_code == 200 and "added to the keystore" in done.text and "steps passed" in done.text
    assert [e["fingerprint"] for e in cockpit.ok(cockpit.get(f"{API}/keystore"))] == [candidate["sha256"]]


def test_flows_and_the_message_log_come_from_the_runtime_state(lab: Lab, cockpit: Cockpit) -> None:
    ran = cli(lab.runtime_home, "run", str(lab.flows), "--once", check=False)
    assert "✓ drain" in ran.stdout, ran.stdout + ran.stderr
    flows = {flow["name"]: flow for flow in cockpit.ok(cockpit.get(f"{API}/flows"))}
    assert flows["drain"]["status"] == "healthy" and flows["drain"]["counts"]["post-processed"] == 6
    assert flows["drain"]["backlog"] == 0 and flows["drain"]["last_poll"] is not None
    assert flows["broken"]["status"] == "failing" and flows["broken"]["consecutive_failures"] >= 1
    assert flows["broken"]["last_error"]
    messages = cockpit.ok(cockpit.get(f"{API}/messages", flow="drain"))
    assert {m["status"] for m in messages} == {"post-processed"} and len(messages) == 6
    found = cockpit.ok(cockpit.get(f"{API}/messages", search=f"{lab.folder} #3"))
    assert [m["subject"] for m in found] == [f"{lab.folder} #3"]
    assert cockpit.ok(cockpit.get(f"{API}/messages", status="quarantined", flow="drain")) == []
    assert len(cockpit.ok(cockpit.get(f"{API}/messages", since="1h", flow="drain"))) == 6
    assert cockpit.ok(cockpit.get(f"{API}/messages", since="2000-01-01T00:00", limit=2)).__len__() == 2
    assert cockpit.get(f"{API}/messages", since="last tuesday").status_code == 422
    assert cockpit.get(f"{API}/messages", status="lost").status_code == 422
    (detail,) = cockpit.ok(cockpit.get(f"{API}/messages/{found[0]['idempotency_key']}"))
    assert detail["subject"] == f"{lab.folder} #3" and [a["outcome"] for a in detail["history"]] == ["delivered"]
    assert detail["history"][0]["detail"].endswith(".eml")
    assert cockpit.get(f"{API}/messages/no-such-key").status_code == 404
    page = cockpit.get("/cockpit/flows", flow="drain")
    assert page.status_code == 200 and "healthy" in page.text and "failing" in page.text
    assert f"{lab.folder} #3" in page.text
    detail_page = cockpit.get(f"/cockpit/messages/{found[0]['idempotency_key']}")
    assert detail_page.status_code == 200 and "delivered" in detail_page.text and found[0]["key"] in detail_page.text
    bad_filter = cockpit.get("/cockpit/flows", since="last tuesday")
    assert bad_filter.status_code == 422 and 'role="alert"' in bad_filter.text


def test_first_start_generates_a_password_shown_once(tmp_path: Path) -> None:
    stack = Stack(tmp_path).init()
    stack.start_hub()
    try:
        admin = stack.cloud_home / "cloud" / "admin.json"
        deadline = time.monotonic() + 10
        while not admin.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stack.hub is not None
        match = re.search(r"generated one \(shown only this once\):\s+\*\*\*\s+(\S+)", stack.hub.log())
        assert match is not None, stack.hub.log()
        assert match.group(1) not in admin.read_text()  # only its argon2id hash is stored
        assert "argon2id" in admin.read_text()
        assert match.group(1) not in (stack.cloud_home / "cloud" / "hub.log").read_text()  # never in the log file
        with Cockpit(stack) as client:
            assert client.login(match.group(1)).status_code == 200
            cli(stack.cloud_home, "cloud", "admin", "set-password", "--password-stdin", stdin="a-new-password\n")
            assert client.get(f"{API}/tokens").status_code == 401  # the old session ended with the old password
            assert client.login("a-new-password").status_code == 200
        short = cli(
            stack.cloud_home, "cloud", "admin", "set-password", "--password-stdin", stdin="short\n", check=False
        )
        assert short.returncode == 2 and "too short" in short.stderr
    finally:
        stack.stop()
