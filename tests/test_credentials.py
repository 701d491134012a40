"""The encrypted credential store: encryption at rest, keys, the CLI, OAuth2 refresh and mail channels using it."""

from __future__ import annotations

import base64
import json
import logging
import os
import ssl
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme

from postbridge.errors import (
    AuthenticationError,
    ConfigurationError,
    NetworkError,
    PostbridgeError,
    ProtocolError,
    TrustError,
)
from postbridge.mail.settings import AuthMethod, Credentials, channel_from_mapping
from postbridge.trust.credentials import (
    KEY_ENV,
    CredentialStore,
    OAuth2Entry,
    PasswordEntry,
    StoreKey,
    summary,
)
from postbridge.trust.truststore import TrustStore
from tests import harness
from tests.harness import cli
from tests.servers import LOOPBACK, free_ports
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPki

PASSWORD = "pw-Zq81-never-shown"
REFRESH = "rt-Kx93-never-shown"
CLIENT_SECRET = "cs-Lm55-never-shown"
ACCESS = "at-Jw27-never-shown"
SECRETS = (PASSWORD, REFRESH, CLIENT_SECRET, ACCESS)


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(harness.ENV, KEY_ENV, raising=False)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def store_of(home: Path, **kwargs: Any) -> CredentialStore:
    kwargs.setdefault("environ", {})
    return CredentialStore(home, **kwargs)


# -- at rest -------------------------------------------------------------------------------------------------------


def test_round_trip_and_nothing_readable_on_disk(home: Path) -> None:
    store = store_of(home)
    assert store.list() == []
    assert not home.exists() or not (home / "credentials.key").exists()  # reading creates no key
    store.add(PasswordEntry("corp-mailbox", "bob.builder", PASSWORD))
    store.add(OAuth2Entry("m365", "alice", "https://login.example/token", "client-1", REFRESH, CLIENT_SECRET))
    assert [(e.name, e.kind, e.user) for e in store.list()] == [
        ("corp-mailbox", "password", "bob.builder"),
        ("m365", "oauth2", "alice"),
    ]
    assert store_of(home).resolve("corp-mailbox") == Credentials("bob.builder", PASSWORD)
    raw = (home / "credentials.json.enc").read_bytes()
    for plain in (PASSWORD, REFRESH, CLIENT_SECRET, "bob.builder", "corp-mailbox", "login.example", "password"):
        assert plain.encode() not in raw
    assert (home / "credentials.json.enc").stat().st_mode & 0o777 == 0o600
    assert (home / "credentials.key").stat().st_mode & 0o777 == 0o600
    assert store.remove("corp-mailbox").user == "bob.builder"
    assert [e.name for e in store_of(home).list()] == ["m365"]


def test_every_write_uses_a_new_nonce(home: Path) -> None:
    store = store_of(home)
    store.add(PasswordEntry("a", "u", PASSWORD))
    first = (home / "credentials.json.enc").read_bytes()
    store.add(PasswordEntry("a", "u", PASSWORD), replace=True)
    second = (home / "credentials.json.enc").read_bytes()
    assert first[:16] == second[:16]  # same magic and key id
    assert first[16:28] != second[16:28]  # nonce


def test_reprs_summaries_and_logs_hold_no_secret(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    password = PasswordEntry("a", "u", PASSWORD)
    oauth = OAuth2Entry("b", "u", "https://x.example/t", "id", REFRESH, CLIENT_SECRET, access_token=ACCESS)
    key = StoreKey.parse(new_key(), "test")
    assert_no_secret(repr(password), repr(oauth), repr(summary(oauth)), json.dumps(summary(password)))
    assert key.encoded() not in repr(key)
    store = store_of(home)
    with caplog.at_level(logging.DEBUG):
        store.add(password)
        store.add(oauth)
        store.list()
    assert_no_secret(caplog.text, repr(store))


def test_wrong_key_is_a_clear_error(home: Path) -> None:
    key = new_key()
    store_of(home, environ={KEY_ENV: key}).add(PasswordEntry("a", "u", PASSWORD))
    assert not (home / "credentials.key").exists()  # the environment's key is not copied beside the data
    with pytest.raises(ConfigurationError) as caught:
        store_of(home, environ={KEY_ENV: new_key()}).list()
    text = str(caught.value)
    assert "the credential store cannot be decrypted with this key" in text
    assert "give the key used when it was created" in text
    assert key not in text and PASSWORD not in text
    with pytest.raises(ConfigurationError, match="exists but its key file"):
        store_of(home).list()  # no environment, no key file
    assert store_of(home, environ={KEY_ENV: key}).resolve("a").secret == PASSWORD


def test_every_flipped_byte_is_detected(home: Path) -> None:
    store_of(home).add(PasswordEntry("a", "u", PASSWORD))
    path = home / "credentials.json.enc"
    original = path.read_bytes()
    for index in range(len(original)):
        damaged = bytearray(original)
        damaged[index] ^= 0x01
        path.write_bytes(bytes(damaged))
        with pytest.raises(ConfigurationError) as caught:
            store_of(home).list()
        if index >= 16:  # past magic and key id: the authentication tag catches it
            assert "fails its integrity check" in str(caught.value)
    for truncated in (b"", original[:20], original[:-1]):
        path.write_bytes(truncated)
        with pytest.raises(ConfigurationError):
            store_of(home).list()


@pytest.mark.parametrize(
    ("text", "match"),
    [("not base64!", "not base64"), (base64.b64encode(b"short").decode(), "5 bytes long, not 32")],
)
def test_bad_key_text_is_refused_without_quoting_it(home: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as caught:
        store_of(home, environ={KEY_ENV: text}).add(PasswordEntry("a", "u", PASSWORD))
    assert text not in str(caught.value)


def test_key_file_elsewhere_is_used_and_never_overwritten(home: Path, tmp_path: Path) -> None:
    key = new_key()
    key_file = tmp_path / "keys" / "pb.key"
    key_file.parent.mkdir()
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    store_of(home, key_file=key_file).add(PasswordEntry("a", "u", PASSWORD))
    assert key_file.read_text().strip() == key
    assert store_of(home, environ={KEY_ENV: key}).resolve("a").secret == PASSWORD
    key_file.chmod(0o644)
    with pytest.raises(ConfigurationError, match="may be read by other users") as caught:
        store_of(home, key_file=key_file).list()
    assert "chmod 600" in str(caught.value)


def test_new_key_file_elsewhere_is_private(home: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "pb.key"
    store_of(home, key_file=key_file).add(PasswordEntry("a", "u", PASSWORD))
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert len(base64.b64decode(key_file.read_text())) == 32


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (PasswordEntry("../etc", "u", PASSWORD), "credential name '../etc' is not valid"),
        (PasswordEntry(".hidden", "u", PASSWORD), "is not valid"),
        (PasswordEntry("a", "u", ""), "password of credential 'a' is empty"),
        (PasswordEntry("a", "u", PASSWORD + "\r\nA1 DELETE INBOX"), "contains a line break"),
        (OAuth2Entry("a", "u", "http://mail.example/token", "id", REFRESH), "must use https"),
        (OAuth2Entry("a", "u", f"https://me:{CLIENT_SECRET}@x.example/t", "id", REFRESH), "user name or password"),
        (OAuth2Entry("a", "u", "https://x.example/t", "id", REFRESH + "\n"), "refresh token of credential 'a'"),
    ],
)
def test_bad_entries_are_refused(home: Path, entry: PasswordEntry | OAuth2Entry, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as caught:
        store_of(home).add(entry)
    assert_no_secret(str(caught.value))


def test_taken_name_needs_replace_and_keeps_created(home: Path) -> None:
    store = store_of(home)
    first = store.add(PasswordEntry("a", "u", PASSWORD))
    with pytest.raises(ConfigurationError, match="already exists"):
        store.add(PasswordEntry("a", "v", "other"))
    second = store.add(PasswordEntry("a", "v", "other"), replace=True)
    assert second.created == first.created and store.resolve("a") == Credentials("v", "other")
    with pytest.raises(ConfigurationError, match=r"no credential named 'b'.*known: a"):
        store.get("b")


# -- CLI -----------------------------------------------------------------------------------------------------------


def test_cli_round_trip(home: Path) -> None:
    added = cli(home, "credentials", "add", "corp-mailbox", "--user", "bob", "--password-stdin", stdin=PASSWORD + "\n")
    assert "stored credential 'corp-mailbox'" in added.stdout and "created the key file" in added.stdout
    cli(
        home, "credentials", "add-oauth2", "m365", "--user", "alice", "--token-url", "https://login.example/t",
        "--client-id", "app-1", "--scope", "mail", "--refresh-token-stdin", "--client-secret-stdin",
        stdin=f"{REFRESH}\n{CLIENT_SECRET}\n",
    )  # fmt: skip
    listed = cli(home, "credentials", "list")
    as_json = cli(home, "credentials", "list", "--json")
    shown = cli(home, "credentials", "show", "m365", "--json")
    rows = json.loads(as_json.stdout)
    assert [(r["name"], r["kind"], r["user"]) for r in rows] == [
        ("corp-mailbox", "password", "bob"),
        ("m365", "oauth2", "alice"),
    ]
    assert set(rows[0]) == {"name", "kind", "user", "created", "updated"}
    assert json.loads(shown.stdout)["kind"] == "oauth2"
    assert "corp-mailbox" in listed.stdout and "m365" in listed.stdout
    entry = store_of(home).get("m365")
    assert isinstance(entry, OAuth2Entry)
    assert (entry.refresh_token, entry.client_secret, entry.scope) == (REFRESH, CLIENT_SECRET, "mail")
    duplicate = cli(home, "credentials", "add", "m365", "--user", "x", "--password-stdin", check=False, stdin="p\n")
    assert duplicate.returncode == 2 and "--replace" in duplicate.stderr
    removed = cli(home, "credentials", "remove", "corp-mailbox")
    assert "removed credential 'corp-mailbox'" in removed.stdout
    assert [r["name"] for r in json.loads(cli(home, "credentials", "list", "--json").stdout)] == ["m365"]
    everything = [added, listed, as_json, shown, duplicate, removed]
    assert_no_secret(*(r.stdout + r.stderr for r in everything))
    assert (home / "credentials.key").stat().st_mode & 0o777 == 0o600


def test_cli_wrong_key_and_tampering_are_clear_errors(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli(home, "credentials", "add", "a", "--user", "bob", "--password-stdin", stdin=PASSWORD + "\n")
    monkeypatch.setitem(harness.ENV, KEY_ENV, new_key())
    wrong = cli(home, "credentials", "list", check=False)
    assert wrong.returncode == 2
    assert "cannot be decrypted with this key" in wrong.stderr and "give the key used when it was" in wrong.stderr
    assert "Traceback" not in wrong.stderr and wrong.stdout == ""
    monkeypatch.delitem(harness.ENV, KEY_ENV)
    path = home / "credentials.json.enc"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40
    path.write_bytes(bytes(data))
    tampered = cli(home, "credentials", "show", "a", check=False)
    assert tampered.returncode == 2 and "fails its integrity check" in tampered.stderr
    assert "Traceback" not in tampered.stderr and "bob" not in tampered.stdout
    assert_no_secret(wrong.stderr, tampered.stderr)


def test_cli_refuses_to_prompt_without_a_terminal(home: Path) -> None:
    result = cli(home, "credentials", "add", "a", "--user", "bob", check=False, stdin="")
    assert result.returncode == 2 and "--password-stdin" in result.stderr
    assert not (home / "credentials.json.enc").exists()


# -- OAuth2 refresh ------------------------------------------------------------------------------------------------


@dataclass
class TokenServer:
    """A tiny token endpoint on loopback: answers from ``answers`` (the last repeats) and records each form."""

    url: str
    answers: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    forms: list[dict[str, str]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def answer(self, status: int, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.answers.append((status, {"Content-Type": "application/json", **(headers or {})}, data))


def serve_tokens(context: ssl.SSLContext | None = None) -> tuple[TokenServer, ThreadingHTTPServer]:
    state = TokenServer("")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.paths.append(f"GET {self.path}")
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            state.paths.append(self.path)
            state.forms.append(dict(urllib.parse.parse_qsl(self.rfile.read(length).decode())))
            status, headers, body = state.answers.pop(0) if len(state.answers) > 1 else state.answers[0]
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
    server.daemon_threads = True
    scheme = "http"
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    state.url = f"{scheme}://{LOOPBACK}:{server.server_address[1]}/oauth2/token"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return state, server


@pytest.fixture
def token_server() -> Iterator[TokenServer]:
    state, server = serve_tokens()
    yield state
    server.shutdown()
    server.server_close()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def oauth_store(home: Path, server: TokenServer, clock: Clock, **kwargs: Any) -> CredentialStore:
    store = store_of(home, clock=clock, **kwargs)
    store.add(OAuth2Entry("m365", "alice", server.url, "app-1", REFRESH, CLIENT_SECRET, scope="mail offline"))
    return store


def test_refresh_posts_the_grant_caches_and_keeps_rotated_token(
    home: Path, token_server: TokenServer, caplog: pytest.LogCaptureFixture
) -> None:
    token_server.answer(200, {"access_token": ACCESS, "token_type": "Bearer", "expires_in": 3600})
    token_server.answer(
        200, {"access_token": "at-2", "token_type": "bearer", "expires_in": 3600, "refresh_token": "rt-rotated"}
    )
    token_server.answer(200, {"access_token": "at-3", "token_type": "Bearer", "expires_in": 3600})
    clock = Clock()
    store = oauth_store(home, token_server, clock)
    with caplog.at_level(logging.DEBUG):
        assert store.resolve("m365") == Credentials("alice", ACCESS, token=True)
        written = (home / "credentials.json.enc").stat().st_mtime_ns
        assert store_of(home, clock=clock).access_token("m365") == ACCESS  # cached in the store, no request
        assert (home / "credentials.json.enc").stat().st_mtime_ns == written  # and no write
        assert len(token_server.forms) == 1
        assert token_server.paths == ["/oauth2/token"]
        assert token_server.forms[0] == {
            "grant_type": "refresh_token",
            "refresh_token": REFRESH,
            "client_id": "app-1",
            "client_secret": CLIENT_SECRET,
            "scope": "mail offline",
        }
        clock.now += 3600 - 59  # within the margin before expiry: refreshed
        assert store.access_token("m365") == "at-2"
        clock.now += 3600
        assert store.access_token(store.get("m365").name) == "at-3"
    assert [form["refresh_token"] for form in token_server.forms] == [REFRESH, REFRESH, "rt-rotated"]
    entry = store.get("m365")
    assert isinstance(entry, OAuth2Entry) and entry.refresh_token == "rt-rotated"
    assert ACCESS.encode() not in (home / "credentials.json.enc").read_bytes()
    assert_no_secret(caplog.text, repr(entry))


def test_answer_without_expiry_is_not_cached(home: Path, token_server: TokenServer) -> None:
    token_server.answer(200, {"access_token": ACCESS, "token_type": "Bearer"})
    store = oauth_store(home, token_server, Clock())
    store.access_token("m365")
    store.access_token("m365")
    assert len(token_server.forms) == 2


@pytest.mark.parametrize(
    ("status", "body", "error", "match"),
    [
        (400, {"error": "invalid_grant", "error_description": f"token {REFRESH} revoked"}, AuthenticationError,
         r"refused the refresh token of credential 'm365': invalid_grant \(token \*\*\* revoked\)"),
        (401, {"error": "invalid_client"}, AuthenticationError, "invalid_client.*client id and client secret"),
        (503, b"busy", NetworkError, "failed for credential 'm365': HTTP 503"),
        (200, b"<html>login</html>", ProtocolError, "not a JSON token answer"),
        (200, {"token_type": "Bearer"}, ProtocolError, "without a usable access_token"),
        (200, {"access_token": "x", "token_type": "mac"}, ProtocolError, "token type 'mac'"),
    ],
)  # fmt: skip
def test_refresh_failures_are_named_without_secrets(
    home: Path, token_server: TokenServer, status: int, body: Any, error: type[PostbridgeError], match: str
) -> None:
    token_server.answer(status, body)
    store = oauth_store(home, token_server, Clock())
    with pytest.raises(error, match=match) as caught:
        store.resolve("m365")
    assert_no_secret(str(caught.value), caught.value.hint)
    assert isinstance(caught.value, PostbridgeError)


def test_redirect_is_not_followed(home: Path, token_server: TokenServer) -> None:
    other, server = serve_tokens()
    try:
        other.answer(200, {"access_token": ACCESS, "token_type": "Bearer"})
        token_server.answer(302, b"", {"Location": other.url})
        token_server.answer(308, b"", {"Location": other.url})
        store = oauth_store(home, token_server, Clock())
        with pytest.raises(ProtocolError, match=r"redirects \(HTTP 302\)"):
            store.access_token("m365")
        with pytest.raises(ProtocolError, match=r"redirects \(HTTP 308\)"):
            store.access_token("m365")
        assert other.paths == []
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_endpoint_is_a_network_error(home: Path) -> None:
    [port] = free_ports(1)
    store = store_of(home)
    store.add(OAuth2Entry("m365", "alice", f"http://{LOOPBACK}:{port}/t", "app-1", REFRESH))
    with pytest.raises(NetworkError, match=f"cannot reach the token endpoint http://{LOOPBACK}:{port}/t"):
        store.resolve("m365")


def test_https_endpoint_is_verified(home: Path) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(LOOPBACK).configure_cert(server_context)
    state, server = serve_tokens(server_context)
    try:
        state.answer(200, {"access_token": ACCESS, "token_type": "Bearer", "expires_in": 600})
        with pytest.raises(TrustError, match="is not trusted"):
            oauth_store(home, state, Clock()).access_token("m365")  # system trust only: trustme's CA is unknown
        client_context = ssl.create_default_context()
        ca.configure_trust(client_context)
        trusted = store_of(home, clock=Clock(), token_context=client_context)
        assert trusted.access_token("m365") == ACCESS
    finally:
        server.shutdown()
        server.server_close()


# -- mail channels ---------------------------------------------------------------------------------------------


def test_channel_resolves_a_credential_name(home: Path, token_server: TokenServer) -> None:
    token_server.answer(200, {"access_token": ACCESS, "token_type": "Bearer", "expires_in": 600})
    store = oauth_store(home, token_server, Clock())
    store.add(PasswordEntry("corp", "bob", PASSWORD))
    base = {"address": "mail.corp.example:143"}
    plain = channel_from_mapping({**base, "credential": "corp"}, source="t.toml", credentials=store)
    assert plain.credentials == Credentials("bob", PASSWORD) and plain.auth is AuthMethod.PLAIN
    oauth = channel_from_mapping({**base, "credential": "m365", "auth": "xoauth2"}, source="t.toml", credentials=store)
    assert oauth.credentials == Credentials("alice", ACCESS, token=True)
    by_default = channel_from_mapping({**base, "credential": "m365"}, source="t.toml", credentials=store)
    assert by_default.auth is AuthMethod.XOAUTH2  # an OAuth2 entry needs no 'auth' set by hand
    bearer = channel_from_mapping({**base, "credential": "m365", "auth": "oauthbearer"}, source="t", credentials=store)
    assert bearer.auth is AuthMethod.OAUTHBEARER
    with pytest.raises(ConfigurationError, match="holds an OAuth2 token, which auth 'plain' cannot use"):
        channel_from_mapping({**base, "credential": "m365", "auth": "plain"}, source="t.toml", credentials=store)
    with pytest.raises(ConfigurationError, match="holds a password, which auth 'xoauth2' cannot use"):
        channel_from_mapping({**base, "credential": "corp", "auth": "xoauth2"}, source="t.toml", credentials=store)
    called = channel_from_mapping({**base, "credential": "x"}, source="t", credentials=lambda n: Credentials(n, "s"))
    assert called.credentials == Credentials("x", "s")
    with pytest.raises(ConfigurationError, match="no credential store given"):
        channel_from_mapping({**base, "credential": "corp"}, source="t.toml")
    with pytest.raises(ConfigurationError, match="both credential 'corp' and a user/password"):
        channel_from_mapping({**base, "credential": "corp", "user": "bob"}, source="t.toml", credentials=store)
    with pytest.raises(ConfigurationError, match="no credential named 'nope'"):
        channel_from_mapping({**base, "credential": "nope"}, source="t.toml", credentials=store)
    assert_no_secret(repr(plain), repr(oauth))


def test_mail_poll_with_a_stored_credential(dovecot: Dovecot, test_pki: TestPki, tmp_path: Path) -> None:
    home = tmp_path / "home"
    TrustStore(home / "keystore").add(test_pki.root_pem.read_bytes(), alias="corp-root")
    cli(home, "credentials", "add", "bob-mail", "--user", "bob", "--password-stdin", stdin="secret\n")
    cli(home, "credentials", "add", "bob-wrong", "--user", "bob", "--password-stdin", stdin="not-the-password\n")
    subject = f"credential poll {uuid.uuid4().hex}"
    dovecot.deliver("bob", f"From: a@corp.example\r\nSubject: {subject}\r\n\r\nhello\r\n".encode())
    config = tmp_path / "channel.toml"
    config.write_text(
        f'[sender]\naddress = "{dovecot.host}:{dovecot.imap_port}"\nprotection = "starttls-mandatory"\n'
        f'credential = "bob-mail"\ntls_server_name = "mail.corp.example"\n'
    )
    polled = cli(home, "mail", "poll", "--config", str(config), "--json")
    assert subject in [json.loads(line)["subject"] for line in polled.stdout.splitlines()]
    refused = cli(home, "mail", "poll", "--config", str(config), "--credential", "bob-wrong", check=False)
    assert refused.returncode == 1 and "refused the login of 'bob'" in refused.stderr
    assert "not-the-password" not in refused.stdout + refused.stderr
    (home / "credentials.key").write_text(new_key() + "\n")
    wrong_key = cli(home, "mail", "poll", "--config", str(config), check=False)
    assert wrong_key.returncode == 2 and "cannot be decrypted with this key" in wrong_key.stderr
    assert "secret" not in polled.stderr + refused.stderr + wrong_key.stderr
