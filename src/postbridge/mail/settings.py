"""Channel settings of the mail adapter: one model shared by the library, the CLI, flows and the UI.

A channel is where mail is read (IMAP/POP3 *sender* channel) or sent (SMTP *receiver* channel): address, proxy
(``internet`` or ``on-premise`` through the hub's SOCKS5 proxy and a location ID), protection, authentication and
trust. Values are validated once, here, with messages that quote the bad value; TOML files are loaded with
``tomllib`` and report the file and key. This module must not do network I/O itself; a ``credential`` name is
handed to the caller's resolver (the credential store, which may fetch an OAuth2 access token).
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from postbridge.addresses import HostPort, parse_host_port
from postbridge.errors import ConfigurationError

BINDING_ENV = "POSTBRIDGE_BINDING"


class Proxy(enum.StrEnum):
    INTERNET = "internet"
    ON_PREMISE = "on-premise"


class Protection(enum.StrEnum):
    OFF = "off"
    STARTTLS_MANDATORY = "starttls-mandatory"
    STARTTLS_OPTIONAL = "starttls-optional"
    TLS = "tls"  # implicit TLS: IMAPS, POP3S, SMTPS


class AuthMethod(enum.StrEnum):
    NONE = "none"
    PLAIN = "plain"
    LOGIN = "login"
    CRAM_MD5 = "cram-md5"
    XOAUTH2 = "xoauth2"
    OAUTHBEARER = "oauthbearer"


@dataclass(frozen=True)
class Credentials:
    """A user and a secret (password or OAuth2 access token). The secret never appears in repr or logs."""

    user: str
    secret: str = field(repr=False)
    token: bool = False  # the secret is an OAuth2 access token (a credential store OAuth2 entry), not a password


_TOKEN_METHODS = ("xoauth2", "oauthbearer")


@runtime_checkable
class CredentialResolver(Protocol):
    """Turns a credential name into a user and a secret (``postbridge.trust.credentials.CredentialStore``)."""

    def resolve(self, name: str) -> Credentials: ...


@dataclass(frozen=True)
class Binding:
    """What ``postbridge cloud binding`` prints: how a cloud application reaches the hub."""

    socks: HostPort
    subaccount: str
    client_secret: str = field(repr=False)
    ca_certificate: str = field(default="", repr=False)
    token_url: str = ""

    @classmethod
    def from_json(cls, data: Any, *, source: str) -> Binding:
        hint = "use the JSON printed by 'postbridge cloud binding SUBACCOUNT --secret SECRET'"
        if not isinstance(data, dict):
            raise ConfigurationError(f"binding '{source}' is not a JSON object", hint=hint)
        try:
            socks = HostPort(str(data["onpremise_proxy_host"]), int(data["onpremise_socks5_proxy_port"]))
            return cls(
                socks=socks,
                subaccount=str(data["clientid"]),
                client_secret=str(data["clientsecret"]),
                ca_certificate=str(data.get("ca_certificate", "")),
                token_url=str(data.get("token_service_url", "")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigurationError(f"binding '{source}' lacks or mistypes {exc}", hint=hint) from exc

    @classmethod
    def load(cls, value: str | None = None) -> Binding:
        """From a file path or JSON text; ``None`` reads ``POSTBRIDGE_BINDING`` (path or JSON)."""
        text = value if value is not None else os.environ.get(BINDING_ENV, "")
        if not text:
            raise ConfigurationError(
                "proxy 'on-premise' needs the hub's binding",
                hint=f"pass --binding FILE or set {BINDING_ENV} to the file (or JSON) from 'postbridge cloud binding'",
            )
        source = "the binding"
        if not text.lstrip().startswith("{"):
            source = text
            try:
                text = Path(text).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigurationError(f"cannot read binding file '{source}': {exc.strerror}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"binding '{source}' is not valid JSON: {exc.msg} (line {exc.lineno})") from exc
        return cls.from_json(data, source=source)


@dataclass(frozen=True)
class ChannelSettings:
    """How to reach and talk to one mail server."""

    address: HostPort
    proxy: Proxy = Proxy.INTERNET
    location_id: str = ""
    binding: Binding | None = None
    timeout: float = 30.0
    protection: Protection = Protection.STARTTLS_MANDATORY
    auth: AuthMethod = AuthMethod.PLAIN
    credentials: Credentials | None = None
    tls_server_name: str | None = None
    allow_cleartext_auth: bool = False
    keystore: Path | None = None  # trusted roots and intermediates (a trust store folder)
    use_system_trust: bool = False

    def __post_init__(self) -> None:
        if self.proxy is Proxy.ON_PREMISE and self.binding is None:
            raise ConfigurationError(
                f"channel {self.address} uses proxy 'on-premise' but has no binding",
                hint=f"give the binding from 'postbridge cloud binding' (--binding FILE or {BINDING_ENV})",
            )
        if self.auth is not AuthMethod.NONE and self.credentials is None:
            raise ConfigurationError(
                f"channel {self.address} uses authentication '{self.auth}' but has no user and password",
                hint="give --user and a password (or a credential name), or set auth = 'none'",
            )
        if not 0 < self.timeout <= 3600:
            raise ConfigurationError(f"timeout {self.timeout!r} is not between 0 and 3600 seconds")

    @property
    def server_name(self) -> str:
        """The name the server's certificate must carry."""
        return self.tls_server_name or self.address.host

    @property
    def describe(self) -> str:
        via = (
            f"on-premise via location '{self.location_id or '(default)'}'"
            if self.proxy is Proxy.ON_PREMISE
            else "internet"
        )
        return f"{self.address} ({via}, protection {self.protection}, auth {self.auth})"


def parse_enum(enum_type: type[enum.StrEnum], value: str, what: str) -> Any:
    """Parse a setting's value, listing the allowed ones when it is wrong."""
    try:
        return enum_type(value.strip().lower())
    except ValueError:
        allowed = ", ".join(member.value for member in enum_type)
        raise ConfigurationError(f"{what} '{value}' is not one of: {allowed}") from None


def parse_bool(value: Any, what: str) -> bool:
    """true/false as TOML booleans or the usual words; anything else is an error (never bool("false"))."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0", ""):
        return False
    raise ConfigurationError(f"{what} '{value}' is not true or false")


def parse_seconds(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{what} '{value}' is not a number of seconds") from None


def channel_from_mapping(
    data: dict[str, Any],
    *,
    source: str,
    credentials: CredentialResolver | Callable[[str], Credentials] | None = None,
) -> ChannelSettings:
    """Build settings from a TOML table / dict of strings (keys as in the docs); quotes the bad key.

    ``credential = "NAME"`` (instead of ``user``/``password``) is resolved through ``credentials`` (a credential
    store or a callable); raises ConfigurationError without one, and what the resolver raises.
    """
    known = {
        "address", "proxy", "location_id", "binding", "timeout", "protection", "auth", "user", "password",
        "credential", "tls_server_name", "allow_cleartext_auth", "keystore", "use_system_trust",
    }  # fmt: skip
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigurationError(
            f"{source}: unknown setting(s) {', '.join(unknown)}", hint=f"known: {', '.join(sorted(known))}"
        )
    if "address" not in data:
        raise ConfigurationError(f"{source}: 'address' is missing", hint='e.g. address = "mail.corp.example:143"')
    proxy = parse_enum(Proxy, str(data.get("proxy", "internet")), f"{source}: proxy")
    user = data.get("user")
    resolved = Credentials(str(user), str(data.get("password", ""))) if user else None
    credential = str(data.get("credential") or "")
    if credential:
        if user or data.get("password"):
            raise ConfigurationError(
                f"{source}: both credential '{credential}' and a user/password are given",
                hint="keep either 'credential' (a name in the credential store) or 'user' and 'password'",
            )
        if credentials is None:
            raise ConfigurationError(
                f"{source}: credential '{credential}' cannot be looked up here (no credential store given)",
                hint="use 'postbridge mail … --credential NAME', or give user and password",
            )
        if isinstance(credentials, CredentialResolver):
            resolved = credentials.resolve(credential)
        else:
            resolved = credentials(credential)
    default_auth = ("xoauth2" if resolved.token else "plain") if resolved else "none"
    auth = str(data.get("auth") or default_auth)
    if resolved is not None and credential and resolved.token != (auth in _TOKEN_METHODS):
        holds = "an OAuth2 token" if resolved.token else "a password"
        raise ConfigurationError(
            f"{source}: credential '{credential}' holds {holds}, which auth '{auth}' cannot use",
            hint="use auth 'xoauth2' or 'oauthbearer' for an OAuth2 credential (the default), and plain, login or "
            "cram-md5 for a password",
        )
    return ChannelSettings(
        address=parse_host_port(str(data["address"]), what=f"{source}: address"),
        proxy=proxy,
        location_id=str(data.get("location_id", "")),
        binding=Binding.load(data.get("binding")) if proxy is Proxy.ON_PREMISE else None,
        timeout=parse_seconds(data.get("timeout", 30.0), f"{source}: timeout"),
        protection=parse_enum(Protection, str(data.get("protection", "starttls-mandatory")), f"{source}: protection"),
        auth=parse_enum(AuthMethod, auth, f"{source}: auth"),
        credentials=resolved,
        tls_server_name=data.get("tls_server_name") or None,
        allow_cleartext_auth=parse_bool(data.get("allow_cleartext_auth", False), f"{source}: allow_cleartext_auth"),
        keystore=Path(str(data["keystore"])) if data.get("keystore") else None,
        use_system_trust=parse_bool(data.get("use_system_trust", False), f"{source}: use_system_trust"),
    )
