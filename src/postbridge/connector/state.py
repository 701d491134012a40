"""The connector's files in ``HOME/connector`` and the TLS contexts built from them.

``identity.json`` is written last during enrollment and renewal, so its presence means "enrolled" and a crash in
between leaves the previous, working certificate in place. This module must not do network I/O.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from postbridge.addresses import HostPort, parse_host_port
from postbridge.connector.audit import AuditLog
from postbridge.connector.mappings import MappingStore
from postbridge.errors import HomeError
from postbridge.home import atomic_write, read_json, write_json
from postbridge.trust import pki
from postbridge.trust.truststore import TrustStore

ALPN_TUNNEL = "h2"
ALPN_ENROLL = "postbridge-enroll/1"


@dataclass(frozen=True)
class Enrollment:
    identity: pki.ConnectorIdentity
    cloud: HostPort


class ConnectorState:
    """Access to ``HOME/connector``."""

    def __init__(self, home: Path) -> None:
        self.dir = home / "connector"
        self.credentials_path = self.dir / "client.pem"  # certificate + key in one file: replaced atomically
        self.hub_ca_path = self.dir / "hub-ca.pem"
        self.identity_path = self.dir / "identity.json"
        self.mappings = MappingStore(self.dir / "mappings.json")
        self.truststore = TrustStore(self.dir / "truststore")
        self.audit = AuditLog(self.dir / "audit.log")
        self.trace_path = self.dir / "trace.log"

    @property
    def enrolled(self) -> bool:
        return self.identity_path.exists()

    def enrollment(self) -> Enrollment:
        """The stored enrollment; HomeError when the connector was never enrolled."""
        data = read_json(self.identity_path)
        if not data:
            raise HomeError(
                f"this connector is not enrolled (no '{self.identity_path}')",
                hint="run 'postbridge connector enroll --cloud HOST:PORT --token TOKEN' with a token from "
                "'postbridge cloud enroll SUBACCOUNT --location ID'",
            )
        identity = pki.ConnectorIdentity(data["subaccount"], data["location"], data["connector_id"])
        return Enrollment(identity, parse_host_port(data["cloud"], what="hub address"))

    def save(
        self, identity: pki.ConnectorIdentity, cloud: HostPort, key_pem: bytes, cert_pem: bytes, ca_pem: bytes
    ) -> None:
        """Store certificate + key (one file, so they can never mismatch) and hub CA, then the identity."""
        atomic_write(self.credentials_path, cert_pem + key_pem)
        atomic_write(self.hub_ca_path, ca_pem)
        write_json(
            self.identity_path,
            {
                "subaccount": identity.subaccount,
                "location": identity.location,
                "connector_id": identity.connector_id,
                "cloud": str(cloud),
            },
        )

    def certificate(self) -> x509.Certificate:
        return pki.load_certificates(self.credentials_path.read_bytes(), source=str(self.credentials_path))[0]

    def tunnel_context(self, alpn: str = ALPN_TUNNEL) -> ssl.SSLContext:
        """Client context for the hub: TLS 1.3, the pinned hub CA only, host name checked, our certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_verify_locations(cadata=self.hub_ca_path.read_text())
        context.load_cert_chain(str(self.credentials_path))
        context.set_alpn_protocols([alpn])
        return context
