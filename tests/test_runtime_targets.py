"""Flow targets against real endpoints on loopback: an HTTP(S) server in a thread, folders, the real Postfix
delivering into the real Dovecot, and Python modules written by the test; plus build_target's validation."""

from __future__ import annotations

import base64
import dataclasses
import email.policy
import errno
import http.server
import json
import logging
import os
import socket
import ssl
import stat
import sys
import threading
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme

from postbridge.errors import ConfigurationError
from postbridge.runtime.targets import Delivery, Target, TargetError, build_target
from postbridge.trust.credentials import CredentialStore, OAuth2Entry, PasswordEntry
from tests.servers import LOOPBACK, free_port
from tests.servers.dovecot import Dovecot
from tests.servers.postfix import Postfix

SOURCE = "flows.toml [flow.target] of flow 'invoices'"
TOKEN = "tok-" + "9f8e7d6c5b4a" * 3  # what a header refers to through ${PB_TEST_TOKEN}
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 8


def build(table: dict[str, Any], home: Path, **kwargs: Any) -> Target:
    return build_target(table, source=SOURCE, home=home, **kwargs)


def delivery(raw: bytes, *, key: str | None = None, attempt: int = 1) -> Delivery:
    return Delivery(
        flow="invoices",
        key="INBOX/1234/77",
        idempotency_key=key or uuid.uuid4().hex,
        raw=raw,
        mailbox="INBOX",
        uid=77,
        received_at=1_700_000_000.5,
        attempt=attempt,
    )


def simple_message(subject: str = "Invoice 4711", sender: str = "alice@corp.example", to: str = "") -> bytes:
    to = to or "bob@corp.example"
    return (
        f"From: Alice <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@corp.example>\r\nDate: Wed, 01 May 2024 10:00:00 +0200\r\n\r\n"
        "Please pay.\r\n.\r\nThanks.\r\n"
    ).encode()


def rich_message() -> bytes:
    message = EmailMessage()
    message["From"] = "Älice Example <alice@corp.example>"
    message["To"] = "Bob <bob@corp.example>, carol@corp.example"
    message["Cc"] = "dave@corp.example"
    message["Subject"] = "Rechnung für März – Grüße"
    message["Date"] = "Wed, 01 May 2024 10:00:00 +0200"
    message["Message-ID"] = "<rich-1@corp.example>"
    message.set_content("Hallo Bob,\nanbei die Rechnung.\n")
    message.add_alternative("<p>Hallo <b>Bob</b></p>", subtype="html")
    message.add_attachment(PDF, maintype="application", subtype="pdf", filename="Rechnung März.pdf")
    message.add_attachment(b"a;b\r\n1;2\r\n", maintype="text", subtype="csv", filename="lines.csv")
    return message.as_bytes(policy=email.policy.SMTP)


def errors_of(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


# -- an HTTP(S) endpoint ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: bytes


class _Endpoint(http.server.ThreadingHTTPServer):
    daemon_threads = True
    requests: list[Recorded]


class _Handler(http.server.BaseHTTPRequestHandler):
    """POST /status/<code>: answers <code> with a short text; /created: 201 with a Location; /echo/<code>: answers
    <code> with the Authorization header in the body (a careless server); anything else: 200."""

    server: _Endpoint

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        self.server.requests.append(Recorded(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        parts = self.path.strip("/").split("/")
        status, text, extra = 200, b"ok", {}
        if parts[0] == "status":
            status, text = int(parts[1]), f"refused: code {parts[1]} because the invoice number is missing".encode()
        elif parts[0] == "echo":
            status, text = int(parts[1]), f"bad token {self.headers.get('authorization')}".encode()
        elif parts[0] == "created":
            status, extra = 201, {"Location": "/messages/42"}
        self.send_response(status)
        for name, value in extra.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _serve(context: ssl.SSLContext | None = None) -> Iterator[tuple[str, _Endpoint]]:
    server = _Endpoint((LOOPBACK, 0), _Handler)
    server.requests = []
    scheme = "http"
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"{scheme}://{LOOPBACK}:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def endpoint() -> Iterator[tuple[str, _Endpoint]]:
    """A plain-http endpoint on loopback recording every request."""
    yield from _serve()


@pytest.fixture(scope="module")
def https_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_endpoint(https_ca: trustme.CA) -> Iterator[tuple[str, _Endpoint]]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    https_ca.issue_cert(LOOPBACK, "localhost").configure_cert(context)
    yield from _serve(context)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


# -- http -------------------------------------------------------------------------------------------------------


def test_http_raw_posts_the_exact_bytes_with_the_idempotency_key(
    endpoint: tuple[str, _Endpoint], tmp_path: Path
) -> None:
    url, server = endpoint
    target = build({"kind": "http", "url": f"{url}/created"}, tmp_path)
    raw = rich_message()
    item = delivery(raw)
    try:
        result = target.deliver(item)
    finally:
        target.close()
    assert result.ref == "HTTP 201 /messages/42" and not result.duplicate
    (request,) = server.requests
    assert request.body == raw
    assert request.headers["content-type"] == "message/rfc822"
    assert request.headers["idempotency-key"] == item.idempotency_key


def test_http_json_round_trips_fields_and_attachments(endpoint: tuple[str, _Endpoint], tmp_path: Path) -> None:
    url, server = endpoint
    target = build(
        {"kind": "http", "url": f"{url}/", "format": "json", "idempotency_header": "X-Request-Key"}, tmp_path
    )
    item = delivery(rich_message())
    assert target.deliver(item).ref == "HTTP 200"
    target.close()
    (request,) = server.requests
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-request-key"] == item.idempotency_key and "idempotency-key" not in request.headers
    data = json.loads(request.body)
    assert data["from"] == "Älice Example <alice@corp.example>"
    assert data["to"] == ["Bob <bob@corp.example>", "carol@corp.example"]
    assert data["cc"] == ["dave@corp.example"]
    assert data["subject"] == "Rechnung für März – Grüße"
    assert data["date"] == "2024-05-01T10:00:00+02:00"
    assert data["message_id"] == "<rich-1@corp.example>"
    assert data["text"] == "Hallo Bob,\nanbei die Rechnung.\n"
    assert data["html"] == "<p>Hallo <b>Bob</b></p>\n"
    pdf, csv = data["attachments"]
    assert (pdf["filename"], pdf["content_type"], pdf["size"]) == ("Rechnung März.pdf", "application/pdf", len(PDF))
    assert base64.b64decode(pdf["content_base64"]) == PDF
    assert (csv["filename"], csv["content_type"]) == ("lines.csv", "text/csv")
    assert base64.b64decode(csv["content_base64"]) == b"a;b\r\n1;2\r\n"
    assert {"name": "Subject", "value": "Rechnung für März – Grüße"} in data["headers"]
    assert data["postbridge"]["idempotency_key"] == item.idempotency_key and data["postbridge"]["uid"] == 77


def test_http_json_of_a_plain_message_has_no_html_and_no_attachments(
    endpoint: tuple[str, _Endpoint], tmp_path: Path
) -> None:
    url, server = endpoint
    target = build({"kind": "http", "url": url, "format": "json"}, tmp_path)
    target.deliver(delivery(simple_message()))
    data = json.loads(server.requests[0].body)
    assert data["text"] == "Please pay.\n.\nThanks.\n" and data["html"] is None and data["attachments"] == []


@pytest.mark.parametrize("status", [503, 500, 429, 408])
def test_http_busy_answers_are_retryable_with_the_same_key(
    endpoint: tuple[str, _Endpoint], tmp_path: Path, status: int
) -> None:
    url, server = endpoint
    target = build({"kind": "http", "url": f"{url}/status/{status}"}, tmp_path)
    first = delivery(simple_message())
    for attempt in (first, dataclasses.replace(first, attempt=2)):
        with pytest.raises(TargetError) as refused:
            target.deliver(attempt)
        assert refused.value.retryable and f"HTTP {status}" in str(refused.value)
    assert [request.headers["idempotency-key"] for request in server.requests] == [first.idempotency_key] * 2


@pytest.mark.parametrize("status", [400, 422, 404])
def test_http_refusals_are_permanent_and_quote_the_answer(
    endpoint: tuple[str, _Endpoint], tmp_path: Path, status: int
) -> None:
    url, _server = endpoint
    target = build({"kind": "http", "url": f"{url}/status/{status}"}, tmp_path)
    with pytest.raises(TargetError) as refused:
        target.deliver(delivery(simple_message()))
    assert not refused.value.retryable
    assert f"HTTP {status}" in refused.value.message
    assert f"refused: code {status} because the invoice number is missing" in refused.value.message
    assert f"{url}/status/{status}" in refused.value.message


def test_http_closed_port_is_retryable(tmp_path: Path) -> None:
    target = build({"kind": "http", "url": f"http://{LOOPBACK}:{free_port()}/hook"}, tmp_path)
    with pytest.raises(TargetError) as refused:
        target.deliver(delivery(simple_message()))
    assert refused.value.retryable and "cannot reach" in refused.value.message


def test_http_silent_server_times_out_retryably(silent_port: int, tmp_path: Path) -> None:
    target = build({"kind": "http", "url": f"http://{LOOPBACK}:{silent_port}/", "timeout": 1}, tmp_path)
    with pytest.raises(TargetError) as refused:
        target.deliver(delivery(simple_message()))
    assert refused.value.retryable and "did not answer within 1 s" in refused.value.message


def test_https_with_ca_file_is_verified(
    tls_endpoint: tuple[str, _Endpoint], https_ca: trustme.CA, tmp_path: Path
) -> None:
    url, server = tls_endpoint
    https_ca.cert_pem.write_to_path(str(tmp_path / "endpoint-ca.pem"))
    target = build({"kind": "http", "url": f"{url}/created", "ca_file": "endpoint-ca.pem"}, tmp_path)  # home-relative
    assert target.deliver(delivery(simple_message())).ref == "HTTP 201 /messages/42"
    assert len(server.requests) == 1


def test_https_without_the_ca_is_refused_permanently(tls_endpoint: tuple[str, _Endpoint], tmp_path: Path) -> None:
    url, server = tls_endpoint
    target = build({"kind": "http", "url": url}, tmp_path)
    with pytest.raises(TargetError) as refused:
        target.deliver(delivery(simple_message()))
    # an untrusted certificate does not heal by waiting: it is a configuration problem, so not retryable
    assert not refused.value.retryable and "certificate" in refused.value.message and "ca_file" in refused.value.hint
    assert server.requests == []


def test_http_header_from_environment_never_shows(
    endpoint: tuple[str, _Endpoint], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore too
    monkeypatch.setenv("PB_TEST_TOKEN", TOKEN)
    url, server = endpoint
    table = {"kind": "http", "url": f"{url}/echo/401", "headers": {"Authorization": "Bearer ${PB_TEST_TOKEN}"}}
    target = build(table, tmp_path)
    with pytest.raises(TargetError) as refused:
        target.deliver(delivery(simple_message()))
    assert server.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert not refused.value.retryable and "bad token ***" in refused.value.message
    assert "Authorization" in refused.value.hint
    for text in (str(refused.value), repr(target), errors_of(caplog)):
        assert TOKEN not in text
    assert "Authorization" in repr(target)


def test_http_missing_environment_variable_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PB_TEST_NOT_SET", raising=False)
    table = {
        "kind": "http",
        "url": "https://hooks.example/in",
        "headers": {"Authorization": "Bearer ${PB_TEST_NOT_SET}"},
    }
    with pytest.raises(ConfigurationError) as problem:
        build(table, tmp_path)
    assert problem.value.message.startswith(SOURCE) and "PB_TEST_NOT_SET" in problem.value.message


def test_http_header_value_with_a_line_break_is_refused_without_showing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PB_TEST_TOKEN", TOKEN + "\r\nX-Injected: 1")
    table = {"kind": "http", "url": "https://hooks.example/in", "headers": {"Authorization": "${PB_TEST_TOKEN}"}}
    with pytest.raises(ConfigurationError) as problem:
        build(table, tmp_path)
    assert "PB_TEST_TOKEN" in problem.value.message and TOKEN not in str(problem.value)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://hooks.example/in", False),
        ("http://10.1.2.3/in", False),
        ("http://127.0.0.1:8080/in", True),
        ("http://[::1]:8080/in", True),
        ("http://localhost/in", True),
        ("https://hooks.example/in", True),
    ],
)
def test_plain_http_only_to_loopback(tmp_path: Path, url: str, allowed: bool) -> None:
    if allowed:
        build({"kind": "http", "url": url}, tmp_path).close()
        return
    with pytest.raises(ConfigurationError, match="plain http") as problem:
        build({"kind": "http", "url": url}, tmp_path)
    assert problem.value.message.startswith(SOURCE) and "allow_http" in problem.value.hint
    build({"kind": "http", "url": url, "allow_http": True}, tmp_path).close()  # the explicit opt-in


def test_http_url_with_a_password_is_refused_without_quoting_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as problem:
        build({"kind": "http", "url": "https://user:pa55word@hooks.example/in?token=abc"}, tmp_path)
    assert "pa55word" not in str(problem.value) and "token=abc" not in str(problem.value)
    assert "https://hooks.example/in" in problem.value.message


def test_http_ca_file_problems_are_configuration_errors(tmp_path: Path) -> None:
    (tmp_path / "not-a-ca.pem").write_text("hello\n")
    for name, words in (("missing.pem", "cannot read ca_file"), ("not-a-ca.pem", "no PEM certificate")):
        with pytest.raises(ConfigurationError, match=words):
            build({"kind": "http", "url": "https://hooks.example/in", "ca_file": name}, tmp_path)


# -- directory --------------------------------------------------------------------------------------------------


def test_directory_writes_message_and_metadata_atomically(tmp_path: Path) -> None:
    folder = tmp_path / "spool" / "invoices"
    target = build({"kind": "directory", "path": str(folder)}, tmp_path)
    raw = simple_message("Rechnung =?utf-8?q?f=C3=BCr?= Mai")
    item = delivery(raw)
    result = target.deliver(item)
    eml, meta = folder / f"{item.idempotency_key}.eml", folder / f"{item.idempotency_key}.json"
    assert result.ref == str(eml) and not result.duplicate
    assert sorted(os.listdir(folder)) == sorted([eml.name, meta.name])  # no temporary file left
    assert eml.read_bytes() == raw
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE(eml.stat().st_mode) == 0o600
    metadata = json.loads(meta.read_text())
    assert metadata == {
        "flow": "invoices",
        "key": "INBOX/1234/77",
        "idempotency_key": item.idempotency_key,
        "mailbox": "INBOX",
        "uid": 77,
        "size": len(raw),
        "subject": "Rechnung für Mai",
        "from": "Alice <alice@corp.example>",
        "message_id": metadata["message_id"],
        "received_at": 1_700_000_000.5,
        "deliveries": 1,
    }
    assert metadata["message_id"].endswith("@corp.example>")


def test_directory_relative_path_is_under_home(tmp_path: Path) -> None:
    target = build({"kind": "directory", "path": "spool"}, tmp_path)
    item = delivery(simple_message())
    assert target.deliver(item).ref == str(tmp_path / "spool" / f"{item.idempotency_key}.eml")


def test_directory_recognises_a_duplicate(tmp_path: Path) -> None:
    target = build({"kind": "directory", "path": str(tmp_path / "out")}, tmp_path)
    item = delivery(simple_message())
    assert not target.deliver(item).duplicate
    again = target.deliver(dataclasses.replace(item, attempt=2))
    third = target.deliver(dataclasses.replace(item, attempt=3))
    assert again.duplicate and third.duplicate and again.ref == third.ref
    assert json.loads((tmp_path / "out" / f"{item.idempotency_key}.json").read_text())["deliveries"] == 3
    assert len(os.listdir(tmp_path / "out")) == 2


def test_directory_never_overwrites_another_message_with_the_same_key(tmp_path: Path) -> None:
    target = build({"kind": "directory", "path": str(tmp_path / "out")}, tmp_path)
    first = delivery(simple_message("one"))
    target.deliver(first)
    with pytest.raises(TargetError) as refused:
        target.deliver(dataclasses.replace(first, raw=simple_message("two")))
    assert not refused.value.retryable and "different message" in refused.value.message
    assert (tmp_path / "out" / f"{first.idempotency_key}.eml").read_bytes() == first.raw


def test_directory_that_cannot_be_made_is_a_permanent_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_text("not a folder")
    folder = tmp_path / "plain-file" / "spool"  # root ignores permissions, but not this
    target = build({"kind": "directory", "path": str(folder)}, tmp_path)
    with pytest.raises(TargetError) as refused:
        target.deliver(delivery(simple_message()))
    assert not refused.value.retryable
    assert str(folder) in refused.value.message and str(folder) in refused.value.hint


def test_directory_full_disk_is_retryable_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "out"
    target = build({"kind": "directory", "path": str(folder)}, tmp_path)
    real_fsync = os.fsync

    def full(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    item = delivery(simple_message())
    with pytest.raises(TargetError) as refused:
        target.deliver(item)
    assert refused.value.retryable and "No space left" in refused.value.message
    assert os.listdir(folder) == []
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert not target.deliver(dataclasses.replace(item, attempt=2)).duplicate  # the retry goes through


def test_directory_fsyncs_files_and_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync, synced = os.fsync, []

    def recording(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    build({"kind": "directory", "path": str(tmp_path / "out")}, tmp_path).deliver(delivery(simple_message()))
    assert synced == ["file", "file", "folder"]  # .eml, .json, then one folder sync makes both renames durable


@pytest.mark.parametrize("key", ["../escaped", "a/b", "..", "x.eml", "", "key with space", "k\r\nX: y"])
def test_directory_idempotency_key_cannot_escape(tmp_path: Path, key: str) -> None:
    folder = tmp_path / "deep" / "out"
    target = build({"kind": "directory", "path": str(folder)}, tmp_path)
    with pytest.raises(TargetError) as refused:
        target.deliver(dataclasses.replace(delivery(simple_message()), idempotency_key=key))
    assert not refused.value.retryable
    assert sorted(path.name for path in tmp_path.rglob("*")) == []  # nothing written anywhere


def test_directory_path_that_is_a_file_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigurationError, match="is not a folder") as problem:
        build({"kind": "directory", "path": str(tmp_path / "taken")}, tmp_path)
    assert problem.value.message.startswith(SOURCE)


# -- smtp -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postfix(dovecot: Dovecot) -> Iterator[Postfix]:
    with Postfix(dovecot) as server:
        yield server


def smtp_table(postfix: Postfix, keystore: Path, **extra: Any) -> dict[str, Any]:
    channel = {
        "address": f"{postfix.host}:{postfix.submission_port}",
        "protection": "starttls-mandatory",
        "user": "alice",
        "password": "secret",
        "keystore": str(keystore),
        "tls_server_name": "mail.corp.example",
        "timeout": 10,
    }
    channel.update(extra.pop("channel", {}))
    return {"kind": "smtp", "channel": channel, "to": [postfix.address("alice")], **extra}


def test_smtp_forwards_with_the_idempotency_header(postfix: Postfix, keystore: Path, tmp_path: Path) -> None:
    target = build(smtp_table(postfix, keystore), tmp_path)
    try:
        items = [delivery(simple_message(f"forwarded {uuid.uuid4().hex}")) for _ in range(2)]  # one session, twice
        results = [target.deliver(item) for item in items]
    finally:
        target.close()
    for item, result in zip(items, results, strict=True):
        subject = email.message_from_bytes(item.raw)["subject"]
        arrived = postfix.wait_for_message("alice", subject).read_bytes()
        assert f"X-Postbridge-Idempotency-Key: {item.idempotency_key}".encode() in arrived
        assert b"Return-Path: <alice@corp.example>" in arrived  # the original sender was kept
        assert b"\n\nPlease pay.\n.\nThanks.\n" in arrived
        assert result.ref.startswith("250 ") and "queued as" in result.ref and not result.duplicate
    assert "secret" not in repr(target)


def test_smtp_envelope_sender_can_be_set(postfix: Postfix, keystore: Path, tmp_path: Path) -> None:
    subject = f"resent {uuid.uuid4().hex}"
    target = build(smtp_table(postfix, keystore, **{"from": "bob@corp.example"}), tmp_path)
    target.deliver(delivery(simple_message(subject)))
    target.close()
    assert b"Return-Path: <bob@corp.example>" in postfix.wait_for_message("alice", subject).read_bytes()


def test_smtp_unknown_recipient_is_permanent(postfix: Postfix, keystore: Path, tmp_path: Path) -> None:
    target = build(smtp_table(postfix, keystore, to=["nobody@corp.example"]), tmp_path)
    with pytest.raises(TargetError) as refused:
        target.deliver(delivery(simple_message()))
    target.close()
    assert (
        not refused.value.retryable and "550" in refused.value.message and "nobody@corp.example" in str(refused.value)
    )


def test_smtp_wrong_password_is_permanent_and_not_shown(postfix: Postfix, keystore: Path, tmp_path: Path) -> None:
    target = build(smtp_table(postfix, keystore, channel={"password": "hunter2-Wr0ng"}), tmp_path)
    with pytest.raises(TargetError) as refused:
        target.deliver(delivery(simple_message()))
    assert not refused.value.retryable and "alice" in refused.value.message
    assert "hunter2-Wr0ng" not in str(refused.value) and "hunter2-Wr0ng" not in repr(target)


def test_smtp_closed_port_is_retryable(keystore: Path, tmp_path: Path) -> None:
    table = {
        "kind": "smtp",
        "channel": {"address": f"{LOOPBACK}:{free_port()}", "auth": "none", "keystore": str(keystore)},
        "to": ["alice@corp.example"],
    }
    target = build(table, tmp_path)
    with pytest.raises(TargetError) as refused:
        target.deliver(delivery(simple_message()))
    assert refused.value.retryable


def test_smtp_credential_from_the_store(postfix: Postfix, keystore: Path, tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "home", environ={})
    store.add(PasswordEntry("relay", "alice", "secret"))
    subject = f"stored credential {uuid.uuid4().hex}"
    table = smtp_table(postfix, keystore)
    del table["channel"]["user"], table["channel"]["password"]
    table["channel"]["credential"] = "relay"
    target = build(table, tmp_path, credentials=store)
    target.deliver(delivery(simple_message(subject)))
    target.close()
    postfix.wait_for_message("alice", subject)


def test_smtp_build_fetches_no_oauth2_token(keystore: Path, tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "home", environ={})
    token_url = f"https://{LOOPBACK}:{free_port()}/token"  # nothing listens: a fetch would fail
    store.add(OAuth2Entry("m365", "alice", token_url, "client-1", "refresh-" + "x" * 20))
    table: dict[str, Any] = {
        "kind": "smtp",
        "channel": {"address": f"{LOOPBACK}:587", "credential": "m365", "keystore": str(keystore)},
        "to": ["alice@corp.example"],
    }
    target = build(table, tmp_path, credentials=store)  # checks the entry exists, fetches nothing
    with pytest.raises(TargetError) as refused:
        target.deliver(delivery(simple_message()))  # now the token is needed, and its endpoint is down
    assert refused.value.retryable and "token" in refused.value.message
    with pytest.raises(ConfigurationError, match="no credential named 'nope'") as problem:
        build({**table, "channel": {**table["channel"], "credential": "nope"}}, tmp_path, credentials=store)
    assert problem.value.message.startswith(SOURCE)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"to": []}, "to is an empty list"),
        ({"to": "alice@corp.example"}, "to must be a list of strings, not a string 'alice@corp.example'"),
        ({"to": ["a@b\r\nRCPT TO:<x@y>"]}, "recipient"),
        ({"channel": {"address": "mail:25", "colour": "blue"}}, "unknown setting(s) colour"),
        ({"channel": {"address": "mail:25", "protection": "maybe"}}, "protection 'maybe'"),
        ({"channel": "mail:25"}, "channel must be a table"),
    ],
)
def test_smtp_settings_are_checked(tmp_path: Path, change: dict[str, Any], words: str) -> None:
    table = {"kind": "smtp", "channel": {"address": "mail:25", "auth": "none"}, "to": ["a@corp.example"], **change}
    with pytest.raises(ConfigurationError) as problem:
        build(table, tmp_path)
    assert problem.value.message.startswith(SOURCE) and words in problem.value.message


# -- python -----------------------------------------------------------------------------------------------------

HOOKS = """
from postbridge.runtime.targets import TargetError

SEEN = []

def store(delivery):
    SEEN.append(delivery)
    return f"stored {delivery.idempotency_key} ({len(delivery.raw)} bytes)"

def quiet(delivery):
    return None

def refuse(delivery):
    raise TargetError("the ERP says: unknown supplier", retryable=False, hint="add the supplier")

def crash(delivery):
    raise ValueError("database is locked")

class Inbox:
    @staticmethod
    def receive(delivery):
        return "inbox"

NOT_CALLABLE = 42
"""


@pytest.fixture
def hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The name of a fresh module (written to tmp_path, on sys.path) holding the functions above."""
    name = f"pb_hooks_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(HOOKS)
    (tmp_path / f"{name}_broken.py").write_text("raise RuntimeError('no configuration for the ERP')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_python_return_value_is_the_ref(hooks: str, tmp_path: Path) -> None:
    target = build({"kind": "python", "callable": f"{hooks}:store"}, tmp_path)
    item = delivery(simple_message())
    assert target.deliver(item).ref == f"stored {item.idempotency_key} ({len(item.raw)} bytes)"
    seen = sys.modules[hooks].SEEN
    assert seen == [item]
    assert build({"kind": "python", "callable": f"{hooks}:quiet"}, tmp_path).deliver(item).ref == (
        f"python {hooks}:quiet"
    )
    assert build({"kind": "python", "callable": f"{hooks}:Inbox.receive"}, tmp_path).deliver(item).ref == "inbox"


def test_python_target_error_passes_through(hooks: str, tmp_path: Path) -> None:
    target = build({"kind": "python", "callable": f"{hooks}:refuse"}, tmp_path)
    with pytest.raises(TargetError) as refused:
        target.deliver(delivery(simple_message()))
    assert not refused.value.retryable and refused.value.message == "the ERP says: unknown supplier"
    assert refused.value.hint == "add the supplier"


def test_python_other_exception_is_retryable(hooks: str, tmp_path: Path) -> None:
    target = build({"kind": "python", "callable": f"{hooks}:crash"}, tmp_path)
    with pytest.raises(TargetError) as refused:
        target.deliver(delivery(simple_message()))
    assert refused.value.retryable and "ValueError: database is locked" in refused.value.message
    assert isinstance(refused.value.__cause__, ValueError)


@pytest.mark.parametrize(
    ("reference", "words"),
    [
        ("pb_no_such_module_here:store", "no module named 'pb_no_such_module_here'"),
        ("{hooks}:missing", "has no attribute 'missing'"),
        ("{hooks}:Inbox.missing", "Inbox has no attribute 'missing'"),
        ("{hooks}:NOT_CALLABLE", "is a int, which cannot be called"),
        ("{hooks}_broken:anything", "RuntimeError: no configuration for the ERP"),
        ("{hooks}.store", "is not 'package.module:function'"),
    ],
)
def test_python_callable_problems_are_found_when_building(
    hooks: str, tmp_path: Path, reference: str, words: str
) -> None:
    with pytest.raises(ConfigurationError) as problem:
        build({"kind": "python", "callable": reference.format(hooks=hooks)}, tmp_path)
    assert problem.value.message.startswith(SOURCE) and words in problem.value.message


# -- build_target validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({}, "'kind' is missing"),
        ({"kind": "ftp"}, "kind 'ftp' is not one of: http, directory, smtp, python"),
        ({"kind": "http", "url": "https://h/", "timout": 3, "verify": False}, "unknown key(s) 'timout', 'verify'"),
        ({"kind": "directory", "path": "x", "url": "https://h/"}, "unknown key(s) 'url' for kind 'directory'"),
        ({"kind": "http"}, "'url' is missing"),
        ({"kind": "http", "url": 42}, "url must be a string, not an integer 42"),
        ({"kind": "http", "url": "https://h/", "timeout": "30"}, "timeout must be a number of seconds, not a string"),
        ({"kind": "http", "url": "https://h/", "timeout": 0}, "timeout = 0 is not between 0 and 3600 seconds"),
        ({"kind": "http", "url": "https://h/", "allow_http": "yes"}, "allow_http must be true or false, not a string"),
        ({"kind": "http", "url": "https://h/", "format": "xml"}, "format 'xml' is not one of: raw, json"),
        ({"kind": "http", "url": "ftp://h/"}, "is not an http(s) URL"),
        ({"kind": "http", "url": "https://h/", "headers": {"Content-Type": "text/plain"}}, "set by postbridge"),
        ({"kind": "http", "url": "https://h/", "headers": {"Bad Name": "x"}}, "not a valid header name"),
        ({"kind": "http", "url": "https://h/", "headers": {"X": 12345}}, "headers.X must be a string, not an integer"),
        ({"kind": "directory", "path": ""}, "path is empty"),
        ({"kind": "python", "callable": ["m:f"]}, "callable must be a string, not a list ['m:f']"),
    ],
)  # fmt: skip
def test_build_target_messages(tmp_path: Path, table: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigurationError) as problem:
        build(table, tmp_path)
    assert problem.value.message.startswith(SOURCE)
    assert words in problem.value.message


def test_build_target_header_value_of_wrong_type_is_not_quoted(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as problem:
        build({"kind": "http", "url": "https://h/", "headers": {"X-Key": 987654321}}, tmp_path)
    assert "987654321" not in str(problem.value)


def test_build_target_is_not_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="must be a table"):
        build_target(["kind", "http"], source=SOURCE, home=tmp_path)  # type: ignore[arg-type]


def test_build_target_does_no_network_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network I/O while building a target")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    tables: list[dict[str, Any]] = [
        {"kind": "http", "url": "https://hooks.invalid/in", "format": "json"},
        {"kind": "smtp", "channel": {"address": "mail.invalid:587", "user": "u", "password": "p"}, "to": ["a@b.c"]},
        {"kind": "directory", "path": str(tmp_path / "later")},
    ]
    for table in tables:
        build(table, tmp_path).close()
    assert not (tmp_path / "later").exists()  # the folder is made at the first delivery
