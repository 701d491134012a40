"""The hub's state in ``HOME/cloud``: CA and server certificate, subaccounts, enrollment tokens, issued certificates.

Files are small JSON documents written atomically; read-modify-write goes through :func:`locked_update`, so the CLI
(``cloud subaccount add``, ``cloud enroll``) and a running hub can change them at the same time. Secrets are stored
only as SHA-256 digests (they are 256-bit random values, so a plain digest is enough) and compared in constant time.

This module must not do network I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from postbridge.errors import AuthenticationError, ConfigurationError, HomeError
from postbridge.home import atomic_write, locked_update, private_dir, read_json, write_json
from postbridge.trust import pki

ENROLL_TOKEN_PREFIX = "pbe1."
DEFAULT_ENROLL_TTL = 15 * 60


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class EnrollmentToken:
    """What a one-time enrollment token carries (the token text is base64url JSON of it)."""

    token_id: str
    secret: str
    ca_fingerprint: str
    subaccount: str
    location: str
    expires_at: float

    def encode(self) -> str:
        body = {
            "id": self.token_id,
            "s": self.secret,
            "ca": self.ca_fingerprint,
            "sub": self.subaccount,
            "loc": self.location,
            "exp": int(self.expires_at),
        }
        raw = json.dumps(body, separators=(",", ":")).encode()
        return ENROLL_TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> EnrollmentToken:
        """Parse a token; raises ConfigurationError naming what is wrong (never echoing the secret)."""
        text = text.strip()
        hint = "copy the whole token printed by 'postbridge cloud enroll SUBACCOUNT --location ID'"
        if not text.startswith(ENROLL_TOKEN_PREFIX):
            raise ConfigurationError(f"enrollment token does not start with '{ENROLL_TOKEN_PREFIX}'", hint=hint)
        payload = text[len(ENROLL_TOKEN_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
            body = json.loads(raw)
            return cls(
                token_id=str(body["id"]),
                secret=str(body["s"]),
                ca_fingerprint=str(body["ca"]),
                subaccount=str(body["sub"]),
                location=str(body["loc"]),
                expires_at=float(body["exp"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError("enrollment token is damaged (cut off or mistyped?)", hint=hint) from exc


class HubState:
    """Access to ``HOME/cloud``. Methods raise HomeError when the hub was not initialised."""

    def __init__(self, home: Path) -> None:
        self.dir = home / "cloud"
        self.ca_key_path = self.dir / "ca.key"
        self.ca_cert_path = self.dir / "ca.pem"
        self.server_key_path = self.dir / "server.key"
        self.server_chain_path = self.dir / "server-chain.pem"
        self.settings_path = self.dir / "hub.json"
        self.subaccounts_path = self.dir / "subaccounts.json"
        self.enrollments_path = self.dir / "enrollments.json"
        self.certificates_path = self.dir / "certificates.json"
        self._cache: dict[Path, tuple[tuple[int, int, int], Any]] = {}

    def _read(self, path: Path, default: Any) -> Any:
        """JSON read with a cache keyed by the file's identity: every SOCKS5 login checks the subaccounts, and a
        stat is far cheaper than reading and parsing. Atomic writes replace the inode, so changes are seen at once."""
        try:
            info = path.stat()
        except FileNotFoundError:
            return default
        stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        value = read_json(path, default)
        self._cache[path] = (stamp, value)
        return value

    # -- initialisation -----------------------------------------------------------------------------------------

    @property
    def initialised(self) -> bool:
        return self.settings_path.exists() and self.ca_cert_path.exists()

    def init(self, hostnames: list[str]) -> dict[str, Any]:
        """Create the CA (kept if it exists) and a server certificate for ``hostnames`` (always re-issued)."""
        if not hostnames:
            raise ConfigurationError("no host name given", hint="pass --hostname NAME (repeat for several names)")
        private_dir(self.dir)
        if self.ca_cert_path.exists():
            ca_key, ca_cert = self.ca()
        else:
            ca_key_new, ca_cert = pki.create_ca("postbridge hub CA")
            ca_key = ca_key_new
            atomic_write(self.ca_key_path, pki.key_pem(ca_key_new))
            atomic_write(self.ca_cert_path, pki.cert_pem(ca_cert), mode=0o644)
        server_key, server_cert = pki.issue_server_certificate(ca_key, ca_cert, hostnames)
        atomic_write(self.server_key_path, pki.key_pem(server_key))
        atomic_write(self.server_chain_path, pki.cert_pem(server_cert) + pki.cert_pem(ca_cert), mode=0o644)
        settings = read_json(self.settings_path, {}) or {}
        settings.setdefault("jwt_key", secrets.token_hex(32))
        settings["hostnames"] = hostnames
        write_json(self.settings_path, settings)
        return {"hostnames": hostnames, "ca_fingerprint": pki.fingerprint(ca_cert)}

    def _require(self) -> None:
        if not self.initialised:
            raise HomeError(
                f"the cloud hub is not initialised in '{self.dir.parent}'",
                hint="run 'postbridge cloud init --hostname NAME' first (or pass the right --home)",
            )

    def settings(self) -> dict[str, Any]:
        value: dict[str, Any] = self._read(self.settings_path, None)
        if value is None or not self.ca_cert_path.exists():
            self._require()
        return value

    def ca(self) -> tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate]:
        key = pki.load_private_key(self.ca_key_path.read_bytes(), source=str(self.ca_key_path))
        cert = pki.load_certificates(self.ca_cert_path.read_bytes(), source=str(self.ca_cert_path))[0]
        assert isinstance(key, CertificateIssuerPrivateKeyTypes.__args__)  # type: ignore[attr-defined]
        return key, cert

    def ca_pem(self) -> bytes:
        self._require()
        return self.ca_cert_path.read_bytes()

    def ca_fingerprint(self) -> str:
        return pki.fingerprint(pki.load_certificates(self.ca_pem(), source=str(self.ca_cert_path))[0])

    def jwt_key(self) -> bytes:
        return bytes.fromhex(self.settings()["jwt_key"])

    # -- subaccounts --------------------------------------------------------------------------------------------

    def add_subaccount(self, name: str) -> tuple[str, str]:
        """Create a subaccount; returns (client_id, client_secret). The secret is shown only this once."""
        self._require()
        name = pki.validate_name(name, "subaccount")
        secret = secrets.token_urlsafe(32)

        def update(current: dict[str, Any]) -> dict[str, Any]:
            if name in current:
                raise ConfigurationError(
                    f"subaccount '{name}' already exists",
                    hint="pick another name; its secret was shown when it was created",
                )
            current[name] = {"client_id": name, "secret_sha256": _digest(secret), "created": _now()}
            return current

        locked_update(self.subaccounts_path, update, default={})
        return name, secret

    def subaccounts(self) -> dict[str, Any]:
        self.settings()  # raises HomeError when the hub was never initialised
        value: dict[str, Any] = self._read(self.subaccounts_path, {}) or {}
        return value

    def verify_client(self, client_id: str, secret: str) -> str:
        """Return the subaccount for valid client credentials; AuthenticationError otherwise (same text either way)."""
        entry = self.subaccounts().get(client_id)
        expected = entry["secret_sha256"] if entry else _digest(secrets.token_hex(8))
        if not hmac.compare_digest(expected, _digest(secret)) or entry is None:
            raise AuthenticationError(
                f"client id '{client_id}' or its secret is wrong",
                hint="use the client id and secret from 'postbridge cloud binding SUBACCOUNT'",
            )
        return client_id

    # -- enrollment ---------------------------------------------------------------------------------------------

    def create_enrollment(self, subaccount: str, location: str, ttl: float = DEFAULT_ENROLL_TTL) -> EnrollmentToken:
        self._require()
        if subaccount not in self.subaccounts():
            raise ConfigurationError(
                f"unknown subaccount '{subaccount}'",
                hint=f"create it with 'postbridge cloud subaccount add {subaccount}'",
            )
        location = pki.validate_name(location, "location ID", allow_empty=True)
        token = EnrollmentToken(
            token_id=secrets.token_hex(8),
            secret=secrets.token_urlsafe(24),
            ca_fingerprint=self.ca_fingerprint(),
            subaccount=subaccount,
            location=location,
            expires_at=time.time() + ttl,
        )

        def update(current: dict[str, Any]) -> dict[str, Any]:
            now = time.time()
            current = {k: v for k, v in current.items() if v["expires_at"] > now - 86400}
            current[token.token_id] = {
                "secret_sha256": _digest(token.secret),
                "subaccount": subaccount,
                "location": location,
                "expires_at": token.expires_at,
                "used": False,
            }
            return current

        locked_update(self.enrollments_path, update, default={})
        return token

    def redeem_enrollment(self, token: EnrollmentToken) -> tuple[str, str]:
        """Mark a token used; returns (subaccount, location). Raises AuthenticationError when unusable."""
        result: dict[str, str] = {}

        def update(current: dict[str, Any]) -> dict[str, Any]:
            entry = current.get(token.token_id)
            if entry is None or not hmac.compare_digest(entry["secret_sha256"], _digest(token.secret)):
                raise AuthenticationError("enrollment token is not known to this hub", hint=_NEW_TOKEN)
            if entry["used"]:
                raise AuthenticationError("enrollment token was already used (tokens are one-time)", hint=_NEW_TOKEN)
            if entry["expires_at"] < time.time():
                expired = datetime.fromtimestamp(entry["expires_at"], UTC).isoformat(timespec="seconds")
                raise AuthenticationError(f"enrollment token expired at {expired}", hint=_NEW_TOKEN)
            entry["used"] = True
            result.update(subaccount=entry["subaccount"], location=entry["location"])
            return current

        locked_update(self.enrollments_path, update, default={})
        return result["subaccount"], result["location"]

    def record_certificate(self, cert: x509.Certificate, identity: pki.ConnectorIdentity) -> None:
        def update(current: dict[str, Any]) -> dict[str, Any]:
            current[format(cert.serial_number, "x")] = {
                "subaccount": identity.subaccount,
                "location": identity.location,
                "connector_id": identity.connector_id,
                "not_after": cert.not_valid_after_utc.isoformat(),
                "issued": _now(),
                "revoked": False,
            }
            return current

        locked_update(self.certificates_path, update, default={})

    def certificate_revoked(self, serial: int) -> bool:
        entry = (read_json(self.certificates_path, {}) or {}).get(format(serial, "x"))
        return entry is None or bool(entry.get("revoked"))


_NEW_TOKEN = "ask the hub operator for a new one: 'postbridge cloud enroll SUBACCOUNT --location ID'"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
