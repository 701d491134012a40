"""The ``http`` flow target: POST each message to a URL, raw (``message/rfc822``) or as JSON (:mod:`targets_json`).

Settings: ``url`` (https; plain http only to a loopback address or with ``allow_http = true``), ``format`` (``raw`` |
``json``), ``headers`` (a table; a value may name environment variables as ``${NAME}``, resolved when the target
is built), ``timeout`` (seconds, default 30), ``ca_file`` (a PEM file of extra trusted CAs, besides the system's),
``idempotency_header`` (default ``Idempotency-Key``: every request carries the delivery's idempotency key in it,
the same on every retry).

Answers: 2xx = delivered (ref ``HTTP 201`` plus the Location, if any); 408, 425, 429, 5xx, network errors and
timeouts = retryable; any other status (3xx: redirects are not followed; 4xx) = permanent, with the first 200
characters of the answer. An untrusted or mismatching certificate is a configuration problem, so permanent too.

Must not: follow redirects, read proxy settings from the environment (``trust_env=False``), verify less than
chain and host name, read more than a few KiB of an answer, or show a header value anywhere (they carry tokens):
not in an error, a log record or a repr; an answer that echoes one gets it masked.
"""

from __future__ import annotations

import json
import logging
import os
import re
import ssl
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from postbridge import __version__
from postbridge.addresses import is_loopback
from postbridge.runtime.targets import (
    Delivery,
    DeliveryResult,
    TargetError,
    TargetTable,
    check_idempotency_key,
    resolve_path,
)
from postbridge.runtime.targets_json import message_json

log = logging.getLogger("postbridge.runtime.targets")

KEYS = ("kind", "url", "format", "headers", "timeout", "ca_file", "idempotency_header", "allow_http")
RETRYABLE_STATUS = frozenset({408, 425, 429})
EXCERPT_BYTES = 4096  # of an answer body, for the error message (which shows 200 characters)
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
_SECRET_NAME = re.compile(r"auth|token|key|secret|password|cookie|signature", re.IGNORECASE)
_SET_BY_US = frozenset({"content-type", "content-length", "host", "transfer-encoding", "connection"})


class HttpTarget:
    """POSTs each delivery to one URL through one httpx client (connections are reused)."""

    kind = "http"

    def __init__(
        self,
        url: str,
        *,
        body_format: str,
        headers: Mapping[str, str],
        secrets: tuple[str, ...],
        timeout: float,
        verify: ssl.SSLContext,
        idempotency_header: str,
    ) -> None:
        self.url = url
        self.where = shown_url(url)
        self.body_format = body_format
        self.timeout = timeout
        self.idempotency_header = idempotency_header
        self._headers = dict(headers)
        self._secrets = tuple(sorted(set(secrets), key=len, reverse=True))  # "Bearer x" before "x"
        self._client = httpx.Client(
            verify=verify, timeout=httpx.Timeout(timeout), trust_env=False, follow_redirects=False
        )

    def __repr__(self) -> str:
        names = ", ".join(sorted(self._headers))
        return f"HttpTarget({self.where!r}, format={self.body_format!r}, headers=[{names}])"

    def deliver(self, delivery: Delivery) -> DeliveryResult:
        """POST the message; raises TargetError (retryable or not, as the module docstring says)."""
        key = check_idempotency_key(delivery.idempotency_key)
        if self.body_format == "json":
            try:
                body = json.dumps(message_json(delivery), ensure_ascii=False).encode("utf-8")
            except Exception as exc:  # the email package gave up on this message; it will not do better later
                raise TargetError(
                    f"message {delivery.key} cannot be turned into JSON ({type(exc).__name__}: {exc})",
                    retryable=False,
                    hint="look at the quarantined message; format = 'raw' sends any message as it is",
                ) from exc
            content_type = "application/json"
        else:
            body, content_type = delivery.raw, "message/rfc822"
        headers = {
            **self._headers,
            "Content-Type": content_type,
            "User-Agent": f"postbridge/{__version__}",
            self.idempotency_header: key,
        }
        try:
            with self._client.stream("POST", self.url, content=body, headers=headers) as response:
                excerpt = _excerpt(response)
        except httpx.TimeoutException as exc:
            raise TargetError(
                f"{self.where} did not answer within {self.timeout:g} s",
                retryable=True,
                hint="the message is sent again later with the same idempotency key; raise timeout if the "
                "endpoint is just slow",
            ) from exc
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc
        log.debug("flow %s: %s answered HTTP %d for %s", delivery.flow, self.where, response.status_code, key)
        return self._result(response, self._mask(excerpt))

    def _result(self, response: httpx.Response, excerpt: str) -> DeliveryResult:
        status = response.status_code
        said = f"HTTP {status} {response.reason_phrase}".rstrip() + (f": {excerpt}" if excerpt else "")
        if 200 <= status < 300:
            location = self._mask(_printable(response.headers.get("location", "")))[:500]
            return DeliveryResult(ref=f"HTTP {status} {location}".rstrip())
        if status in RETRYABLE_STATUS or status >= 500:
            raise TargetError(
                f"{self.where} answered {said}",
                retryable=True,
                hint="the endpoint is busy or failing: the message is sent again later",
            )
        if 300 <= status < 400:
            location = self._mask(_printable(response.headers.get("location", "")))[:200]
            hint = f"redirects are not followed: set url to where it points ({location or 'no Location given'})"
        elif status in (401, 403):
            hint = "the endpoint refused the request's credentials: check the Authorization header in headers"
        elif status == 413:
            hint = "the message is larger than the endpoint takes"
        else:
            hint = "the endpoint refused this message (see its answer); it is quarantined"
        raise TargetError(f"{self.where} refused the message: {said}", retryable=False, hint=hint)

    def _transport_error(self, exc: httpx.HTTPError) -> TargetError:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, OSError):  # ssl.SSLError is an OSError too
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ssl.SSLCertVerificationError):
            return TargetError(
                f"the certificate of {self.where} is not accepted: {cause.verify_message}",
                retryable=False,
                hint="give the CA that issued the endpoint's certificate as ca_file (PEM), or fix the server's "
                "certificate (chain, names)",
            )
        if isinstance(cause, ssl.SSLError):
            return TargetError(
                f"TLS with {self.where} failed: {cause.reason or cause}",
                retryable=False,
                hint="is this an https endpoint? (an http-only port answers a TLS handshake with garbage)",
            )
        text = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(exc) or type(exc).__name__
        return TargetError(
            f"cannot reach {self.where}: {self._mask(text)}",
            retryable=True,
            hint="the message is sent again later with the same idempotency key; check that the endpoint runs",
        )

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def close(self) -> None:
        self._client.close()


def _excerpt(response: httpx.Response) -> str:
    data = b""
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) >= EXCERPT_BYTES:
            break
    return _printable(data[:EXCERPT_BYTES].decode("utf-8", "replace"))[:200]


def _printable(text: str) -> str:
    return " ".join("".join(char if char.isprintable() else " " for char in text).split())


def shown_url(url: str) -> str:
    """The URL without user info, query and fragment (they may carry secrets): scheme, host, port and path."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _check_url(reader: TargetTable) -> str:
    url = reader.required_text("url").strip()
    allow_http = reader.boolean("allow_http", False)
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port
    except ValueError:
        raise reader.error(f"url '{shown_url(url)}' is not a valid URL", hint="e.g. https://host/path") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise reader.error(f"url '{shown_url(url)}' is not an http(s) URL", hint="e.g. https://host/path")
    if parts.username is not None or parts.password is not None:
        raise reader.error(
            f"url '{shown_url(url)}' carries a user name or password",
            hint='send credentials in a header instead: headers = { Authorization = "Bearer ${TOKEN}" }',
        )
    if parts.scheme == "http" and not allow_http and not is_loopback(parts.hostname):
        raise reader.error(
            f"url '{shown_url(url)}' uses plain http to a host that is not this machine",
            hint="use https; only if the network in between is trusted, set allow_http = true",
        )
    return url


def _headers(reader: TargetTable, idempotency_header: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """The headers table with ``${NAME}`` resolved, and the secrets to mask in answers: every environment value
    used and the values of headers named like credentials. A value is never quoted in an error."""
    headers: dict[str, str] = {}
    secrets: list[str] = []
    taken = {*_SET_BY_US, idempotency_header.lower(), "user-agent"}
    for name, value in reader.subtable("headers", {}).items():
        if not _HEADER_NAME.fullmatch(name):
            raise reader.error(f"headers: {name!r} is not a valid header name")
        if name.lower() in taken:
            raise reader.error(f"headers: {name!r} is set by postbridge or given twice", hint="remove it")
        taken.add(name.lower())
        if not isinstance(value, str):
            raise reader.wrong_type(f"headers.{name}", value, "a string", quote=False)
        missing = [ref for ref in _ENV_REFERENCE.findall(value) if ref not in os.environ]
        if missing:
            raise reader.error(
                f"headers.{name} refers to the environment variable(s) {', '.join(missing)}, which are not set",
                hint=f"set {missing[0]} in the environment of postbridge (e.g. in the service's unit file)",
            )
        resolved = _ENV_REFERENCE.sub(lambda found: os.environ[found.group(1)], value)
        if not resolved.isascii() or not all(char.isprintable() or char == "\t" for char in resolved):
            used = ", ".join(_ENV_REFERENCE.findall(value)) or "the value itself"
            raise reader.error(
                f"headers.{name} holds a line break, control or non-ASCII character (from {used})",
                hint="header values must be printable ASCII",
            )
        headers[name] = resolved
        secrets += [os.environ[ref] for ref in _ENV_REFERENCE.findall(value)]
        if _SECRET_NAME.search(name):
            secrets.append(resolved)
    return headers, tuple(secret for secret in secrets if secret)


def _tls_context(reader: TargetTable, home: Path) -> ssl.SSLContext:
    context = ssl.create_default_context()  # the system's CAs, chain and host name checked, TLS 1.2 at least
    ca_file = reader.text("ca_file", "")
    if ca_file:
        path = resolve_path(ca_file, home)
        try:
            context.load_verify_locations(cafile=str(path))
        except OSError as exc:
            if isinstance(exc, ssl.SSLError):
                raise reader.error(f"ca_file '{path}' holds no PEM certificate", hint="give a PEM file") from None
            raise reader.error(f"cannot read ca_file '{path}': {exc.strerror}") from None
    return context


def build(table: Mapping[str, Any], *, source: str, home: Path) -> HttpTarget:
    """The http target of ``table``; raises ConfigurationError (see :func:`targets.build_target`)."""
    reader = TargetTable(table, source, KEYS)
    url = _check_url(reader)
    idempotency_header = reader.text("idempotency_header", "Idempotency-Key") or ""
    if not _HEADER_NAME.fullmatch(idempotency_header):
        raise reader.error(f"idempotency_header {idempotency_header!r} is not a valid header name")
    headers, secrets = _headers(reader, idempotency_header)
    return HttpTarget(
        url,
        body_format=reader.choice("format", ("raw", "json"), "raw"),
        headers=headers,
        secrets=secrets,
        timeout=reader.seconds("timeout", 30.0),
        verify=_tls_context(reader, home),
        idempotency_header=idempotency_header,
    )
