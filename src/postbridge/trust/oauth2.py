"""The OAuth2 refresh-token grant (RFC 6749 section 6) that turns a stored refresh token into an access token.

A POST with ``grant_type=refresh_token`` and the client id (and secret, in the form) over https verified against the
system trust store — plain http only to a loopback address (and then never through an HTTP proxy) — no redirects,
an answer of at most 1 MiB. Refusals are translated into the exception tree with the provider's ``error`` and a hint
per error code; every secret is masked in every message.

Must not: log or put a secret (refresh token, client secret, access token) into a repr or an exception message, or
store anything (:mod:`postbridge.trust.credentials` keeps the entries and the cache).
"""

from __future__ import annotations

import contextlib
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from postbridge import __version__
from postbridge.addresses import is_loopback
from postbridge.errors import (
    AuthenticationError,
    ConfigurationError,
    NetworkError,
    PostbridgeTimeout,
    ProtocolError,
    TrustError,
)

_MAX_ANSWER = 1 << 20
_GRANT_HINTS = {
    "invalid_grant": "the refresh token expired or was revoked: get a new one and store it with "
    "'postbridge credentials add-oauth2 NAME ... --replace'",
    "invalid_client": "check the client id and client secret of the entry (add-oauth2 ... --replace)",
    "unauthorized_client": "the client may not use refresh tokens: check the app registration at the provider",
    "invalid_scope": "check the entry's scope (add-oauth2 ... --scope S --replace)",
}


@dataclass(frozen=True)
class TokenGrant:
    """A token endpoint's answer: access token, lifetime in seconds (0 = not given), rotated refresh token."""

    access_token: str = field(repr=False)
    expires_in: float = 0.0
    refresh_token: str = field(default="", repr=False)


def check_token_url(url: str) -> str:
    """Return ``url`` if it may receive a refresh token: https, or http to a loopback address; no user info.
    Raises ConfigurationError (quoting at most scheme, host and path)."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        host = parts.hostname or ""
        has_userinfo = parts.username is not None or parts.password is not None
        _ = parts.port
    except ValueError:
        raise ConfigurationError(
            "the token URL is not a valid URL", hint="give e.g. https://login.example.com/oauth2/token"
        ) from None
    shown = f"{parts.scheme}://{host}{parts.path}"
    if has_userinfo:
        raise ConfigurationError(
            f"the token URL '{shown}' carries a user name or password", hint="give the client id and secret apart"
        )
    if not host or not (parts.scheme == "https" or (parts.scheme == "http" and is_loopback(host))):
        raise ConfigurationError(
            f"the token URL '{shown}' must use https (plain http is accepted only for a loopback address)",
            hint="give the provider's https token endpoint",
        )
    return url.strip()


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = "".join(char if char.isprintable() else " " for char in text).strip()
    return text if len(text) <= 200 else text[:197] + "..."


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx then surfaces as HTTPError: a refresh token never follows a redirect


def refresh_grant(
    *,
    token_url: str,
    client_id: str,
    client_secret: str,
    refresh_token: str,
    scope: str = "",
    what: str = "the credential",
    context: ssl.SSLContext | None = None,
    timeout: float = 30.0,
) -> TokenGrant:
    """POST ``grant_type=refresh_token`` to ``token_url`` and return the grant.

    Raises ConfigurationError (URL), AuthenticationError (grant or client refused), TrustError (endpoint
    certificate), PostbridgeTimeout, NetworkError (unreachable, HTTP 5xx) and ProtocolError (not a token answer).
    Messages quote the server's error and description with every secret masked.
    """
    url = check_token_url(token_url)
    secrets = (refresh_token, client_secret)
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id}
    if client_secret:
        form["client_secret"] = client_secret
    if scope:
        form["scope"] = scope
    request = urllib.request.Request(
        url,
        data=urllib.parse.urlencode(form).encode("ascii"),
        method="POST",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
            "User-Agent": f"postbridge/{__version__}",
        },
    )
    handlers: list[urllib.request.BaseHandler] = [
        _NoRedirect(),
        urllib.request.HTTPSHandler(context=context or ssl.create_default_context()),
    ]
    if is_loopback(urllib.parse.urlsplit(url).hostname or ""):
        handlers.append(urllib.request.ProxyHandler({}))  # never send loopback traffic to an HTTP proxy
    where = f"token endpoint {url}"
    try:
        with urllib.request.build_opener(*handlers).open(request, timeout=timeout) as response:
            body = response.read(_MAX_ANSWER + 1)
    except urllib.error.HTTPError as exc:
        try:
            answer = exc.read(_MAX_ANSWER + 1) if exc.fp is not None else b""
        finally:
            exc.close()
        raise _refusal(exc.code, answer, exc.headers.get("Location", ""), where, what, secrets) from None
    except urllib.error.URLError as exc:
        raise _unreachable(exc.reason, where) from None
    except (OSError, ValueError) as exc:
        raise _unreachable(exc, where) from None
    return _parse_grant(body, where, secrets)


def _unreachable(reason: object, where: str) -> Exception:
    if isinstance(reason, ssl.SSLCertVerificationError):
        return TrustError(
            f"the certificate of the {where} is not trusted: {reason.verify_message}",
            hint="check the token URL; the endpoint must present a certificate the system trust store accepts",
        )
    if isinstance(reason, ssl.SSLError):
        return TrustError(f"TLS with the {where} failed: {reason.reason or reason}", hint="check the token URL")
    if isinstance(reason, TimeoutError):
        return PostbridgeTimeout(f"the {where} did not answer in time", hint="check the URL and the network")
    text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
    return NetworkError(f"cannot reach the {where}: {text}", hint="check the token URL and the network")


def _refusal(code: int, answer: bytes, location: str, where: str, what: str, secrets: tuple[str, ...]) -> Exception:
    if 300 <= code < 400:
        return ProtocolError(
            f"the {where} redirects (HTTP {code}) to '{_redact(location, secrets)}'",
            hint="give the final token URL: a refresh token is never sent on after a redirect",
        )
    error = description = ""
    with contextlib.suppress(ValueError, AttributeError):
        data = json.loads(answer[:_MAX_ANSWER])
        error = _redact(str(data.get("error", "")), secrets)
        description = _redact(str(data.get("error_description", "")), secrets)
    detail = f"{error} ({description})" if error and description else error or f"HTTP {code}"
    if code >= 500:
        return NetworkError(f"the {where} failed for {what}: {detail}", hint="try again later")
    return AuthenticationError(
        f"the {where} refused the refresh token of {what}: {detail}",
        hint=_GRANT_HINTS.get(error, "check the token URL, client id, client secret and refresh token"),
    )


def _parse_grant(body: bytes, where: str, secrets: tuple[str, ...]) -> TokenGrant:
    try:
        data = json.loads(body[: _MAX_ANSWER + 1]) if len(body) <= _MAX_ANSWER else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ProtocolError(f"the {where} answered something that is not a JSON token answer")
    token, kind, rotated = data.get("access_token"), data.get("token_type", "Bearer"), data.get("refresh_token", "")
    if not isinstance(token, str) or not token or not token.isprintable() or not isinstance(rotated, str):
        raise ProtocolError(f"the {where} answered without a usable access_token")
    if not isinstance(kind, str) or kind.lower() != "bearer":
        raise ProtocolError(f"the {where} answered token type '{_redact(str(kind), secrets)}', not 'Bearer'")
    try:
        expires_in = max(0.0, float(data.get("expires_in", 0) or 0))
    except (TypeError, ValueError):
        raise ProtocolError(f"the {where} answered an expires_in that is not a number") from None
    if rotated and not rotated.isprintable():
        raise ProtocolError(f"the {where} answered an unusable refresh_token")
    return TokenGrant(token, expires_in, rotated)
