"""Client of the hub's HTTPS API, used by the connection test to ask the hub why it refused a SOCKS5 connection.

Owns :class:`HubApi` (OAuth2 token, connected connectors, a location's mappings, a connector's availability
check); :mod:`postbridge.mail.hub_diagnosis` turns a SOCKS5 reply into evidence and a fix with it. The
hub's certificate is verified against the binding's ``ca_certificate`` with host name checking (the names given
to ``postbridge cloud init --hostname``); proxy environment variables are ignored: the API is reached directly.

Must not: change anything on the hub or a connector (the API it calls only reads and checks), print or log, or put
the client secret or an access token into a message, an evidence line or a fix.
"""

from __future__ import annotations

import ssl
import time
import urllib.parse
from types import TracebackType
from typing import Any

import httpx

from postbridge.addresses import HostPort
from postbridge.errors import (
    AuthenticationError,
    ConfigurationError,
    NetworkError,
    PostbridgeError,
    PostbridgeTimeout,
    ProtocolError,
    TrustError,
)
from postbridge.mail.settings import Binding

TOKEN_PATH = "/oauth/token"
CHECK_TIMEOUT = 20.0  # seconds for a check: the hub waits up to 15 s for the connector's answer
BINDING_HINT = "use the binding printed by 'postbridge cloud binding SUBACCOUNT --secret SECRET' on this hub"


class NoConnectorError(NetworkError):
    """The hub has no connector connected at ``location`` for the binding's subaccount (the API's 404)."""

    def __init__(self, message: str, *, location: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.location = location


class HubApi:
    """A synchronous client of the hub's API for the binding's subaccount; a context manager.

    Each method raises NetworkError (unreachable, HTTP 5xx), PostbridgeTimeout, TrustError (the hub's certificate),
    AuthenticationError (client id or secret refused), NoConnectorError (nothing connected at the location) or
    ProtocolError (an answer that is not the API's JSON).
    """

    def __init__(self, binding: Binding, *, timeout: float = 5.0) -> None:
        """Raises ConfigurationError without a usable token URL, TrustError without a readable hub CA."""
        self.base_url = _base_url(binding.token_url)
        self.timeout = timeout
        self._binding = binding
        self._token = ""
        self._token_until = 0.0
        self._client = httpx.Client(
            base_url=self.base_url, verify=_hub_context(binding.ca_certificate), timeout=timeout, trust_env=False
        )

    def __enter__(self) -> HubApi:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def connectors(self) -> list[dict[str, Any]]:
        """The subaccount's connected connectors (``connector_id``, ``location``, ``mappings``, ...)."""
        return _objects(self._call("GET", "/v1/connectors").get("connectors"), "connectors")

    def mappings(self, location: str) -> list[dict[str, Any]]:
        """The mappings (``virtual``, ``internal``, ``protocol``, ...) of the connectors at ``location``."""
        return _objects(self._call("GET", _location_path(location, "mappings"), location).get("mappings"), "mappings")

    def check(self, location: str, virtual: HostPort) -> dict[str, Any]:
        """The availability check of ``virtual`` by a connector at ``location``: its ``CheckResult.to_json()``
        (``reachable``, ``error``, ``reason``, ``hint``, ``summary``, ...) or ``{"mapped": false, "error": ...}``."""
        path = _location_path(location, "check")
        timeout = httpx.Timeout(self.timeout, read=max(self.timeout, CHECK_TIMEOUT))
        return self._call("POST", path, location, json={"virtual": str(virtual)}, timeout=timeout)

    # -- internals ----------------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, location: str | None = None, **options: Any) -> dict[str, Any]:
        for attempt in (1, 2):
            headers = {"authorization": f"Bearer {self._access_token()}"}
            response = self._send(method, path, headers=headers, **options)
            if response.status_code != 401 or attempt == 2:
                break
            self._token = ""  # expired, or the hub's key changed: one fresh token, then give up
        body = _json(response, path)
        status, subaccount = response.status_code, self._binding.subaccount
        detail, hint = self._said(body, status)
        if status == 200 or (status == 404 and body.get("mapped") is False):
            return body  # a 404 with "mapped" is the connector's own answer: it has no such mapping
        if status == 401:
            raise AuthenticationError(
                f"the hub's API refused the token of subaccount '{subaccount}': {detail}", hint=hint
            )
        if status == 404 and location is not None:
            raise NoConnectorError(
                f"no connector is connected at {describe_location(location)} for subaccount '{subaccount}'",
                location=location,
                hint="start the connector ('postbridge connector run') or check the location ID",
            )
        if status >= 500:
            raise NetworkError(f"the hub's API failed on {method} {path}: {detail}", hint=hint or "try again later")
        raise ProtocolError(f"the hub's API answered HTTP {status} to {method} {path}: {detail}", hint=hint)

    def _access_token(self) -> str:
        if self._token and time.monotonic() < self._token_until:
            return self._token
        form = {
            "grant_type": "client_credentials",
            "client_id": self._binding.subaccount,
            "client_secret": self._binding.client_secret,
        }
        response = self._send("POST", TOKEN_PATH, data=form)
        body = _json(response, TOKEN_PATH)
        detail, _hint = self._said(body, response.status_code)
        if response.status_code in (400, 401):
            raise AuthenticationError(
                f"the hub refused the binding's client id '{self._binding.subaccount}' and secret: {detail}",
                hint=BINDING_HINT,
            )
        if response.status_code != 200:
            raise NetworkError(f"the hub's token endpoint failed: {detail}", hint="try again later")
        token, expires_in = body.get("access_token"), body.get("expires_in", 0)
        if not isinstance(token, str) or not token.isprintable() or not isinstance(expires_in, int | float):
            raise ProtocolError("the hub's token endpoint answered without a usable access_token")
        self._token, self._token_until = token, time.monotonic() + expires_in - 30
        return token

    def _said(self, body: dict[str, Any], status: int) -> tuple[str, str]:
        """The API's error (with its description) and hint, the client secret masked should a server echo it."""
        error, description = str(body.get("error") or ""), str(body.get("error_description") or "")
        detail = f"{error} ({description})" if error and description else error or f"HTTP {status}"
        secret = self._binding.client_secret
        return mask_secret(detail, secret), mask_secret(str(body.get("hint") or ""), secret)

    def _send(self, method: str, path: str, **options: Any) -> httpx.Response:
        where = f"the hub's API at {self.base_url}"
        try:
            return self._client.request(method, path, **options)
        except httpx.TimeoutException as exc:
            raise PostbridgeTimeout(
                f"{where} did not answer {method} {path} in time", hint="is the hub running, and is it reachable?"
            ) from exc
        except httpx.HTTPError as exc:
            raise _transport_error(exc, where, urllib.parse.urlsplit(self.base_url).hostname or "") from exc


def _base_url(token_url: str) -> str:
    if not token_url:
        raise ConfigurationError(
            "the binding has no token_service_url, so the hub's API cannot be asked", hint=BINDING_HINT
        )
    try:
        parts = urllib.parse.urlsplit(token_url.strip())
        _ = parts.port
    except ValueError:
        raise ConfigurationError("the binding's token_service_url is not a valid URL", hint=BINDING_HINT) from None
    if (
        parts.scheme != "https"
        or not parts.hostname
        or parts.username is not None
        or parts.password is not None
        or not parts.path.endswith(TOKEN_PATH)
    ):
        shown = f"{parts.scheme}://{parts.hostname or ''}{parts.path}"
        raise ConfigurationError(
            f"the binding's token_service_url '{shown}' is not the hub's 'https://HOST:PORT{TOKEN_PATH}'",
            hint=BINDING_HINT,
        )
    return urllib.parse.urlunsplit(("https", parts.netloc, parts.path[: -len(TOKEN_PATH)], "", ""))


def _hub_context(ca_pem: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname are its defaults
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if not ca_pem.strip():
            raise ValueError("empty")
        context.load_verify_locations(cadata=ca_pem)
    except (ssl.SSLError, ValueError) as exc:
        raise TrustError("the binding's ca_certificate is missing or not a PEM certificate", hint=BINDING_HINT) from exc
    return context


def _transport_error(exc: httpx.HTTPError, where: str, host: str) -> PostbridgeError:
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):  # ssl.SSLError is an OSError too
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        if cause.verify_code in (62, 64):  # host name / IP address mismatch
            return TrustError(
                f"the certificate of {where} does not carry the name '{host}' ({cause.verify_message})",
                hint=f"give 'postbridge cloud init' a --hostname {host}, or take a binding whose --api uses a name "
                "the hub's certificate carries",
            )
        return TrustError(
            f"the certificate of {where} is not trusted: {cause.verify_message}",
            hint="the binding's ca_certificate is not this hub's CA: " + BINDING_HINT,
        )
    if isinstance(cause, ssl.SSLError):
        return TrustError(f"TLS with {where} failed: {cause.reason or cause}", hint="is this the hub's HTTPS API?")
    text = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(exc) or type(exc).__name__
    return NetworkError(
        f"cannot reach {where}: {text}",
        hint="is the hub running with its API on, and is the binding's token_service_url its address?",
    )


def _json(response: httpx.Response, path: str) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ProtocolError(
            f"the hub's API answered HTTP {response.status_code} to {path} with something that is not a JSON object",
            hint="check that the binding's token_service_url is the hub's API",
        )
    return data


def mask_secret(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def _objects(value: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ProtocolError(f"the hub's API answered '{what}' that is not a list of objects")
    return value


def _location_path(location: str, what: str) -> str:
    return f"/v1/locations/{urllib.parse.quote(location, safe='') if location else '-'}/{what}"


def describe_location(location: str) -> str:
    return f"location '{location}'" if location else "the default location"
