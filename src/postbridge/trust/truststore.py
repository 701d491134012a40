"""A trust store: a folder of PEM files, one trusted certificate each, and the TLS client context it makes.

The connector uses one as its *backend trust store* (the certificates it trusts when it opens TLS to an
internal mail server for a ``TCP TLS`` mapping); the cloud keystore of the mail adapter (``HOME/keystore``,
``postbridge keystore ...``) reuses the same class, constructed with its own ``command`` for the hints.
A file is ``<alias>.pem``; aliases are 1-64 characters of ``[A-Za-z0-9._-]`` that do not start with '.'.
Files are written atomically with mode 0600 in a folder of mode 0700.

This module owns adding (all-or-nothing), listing, looking up, removing and the ``ssl.SSLContext`` built ONLY
from the store's certificates. It must not open connections, consult the system trust store, or offer any
"trust all" switch: an empty store trusts nothing.
"""

from __future__ import annotations

import builtins
import re
import ssl
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from postbridge.errors import ConfigurationError, TrustError
from postbridge.home import atomic_write, private_dir
from postbridge.trust.pki import CertificateInfo, cert_pem, describe, load_certificates, parse_fingerprint

_ALIAS = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")
_SUFFIX = ".pem"
DEFAULT_COMMAND = "postbridge connector truststore"
_MIN_PREFIX = 8  # hex digits of a fingerprint prefix that get() accepts (listings show 16)
_HEX = re.compile(r"^[0-9A-F]+$")

# (folder mtime, ((file name, mtime, size, inode), ...)) — what the cached SSL context was built from
_Stamp = tuple[int, tuple[tuple[str, int, int, int], ...]]


@dataclass(frozen=True)
class TrustEntry:
    """One trusted certificate: its alias (the file name without '.pem') and its description."""

    alias: str
    info: CertificateInfo


@dataclass(frozen=True)
class _Loaded:
    entry: TrustEntry
    pem: str
    certificate: x509.Certificate


def validate_alias(alias: str) -> str:
    """Return ``alias`` if it can name a trust store entry; raise ConfigurationError quoting it otherwise."""
    if not _ALIAS.match(alias):
        shown = alias if len(alias) <= 80 else alias[:77] + "..."
        raise ConfigurationError(
            f"alias '{shown}' is not valid: it must be 1 to 64 characters of letters, digits, '.', '_' "
            "and '-' and must not start with '.'",
            hint="choose an alias such as 'corp-root-ca'",
        )
    return alias


class TrustStore:
    """The certificates in ``directory`` (created on first :meth:`add`) and the TLS context they make.

    ``command`` is the CLI group that manages this store; hints in error messages name it.
    """

    def __init__(self, directory: Path, *, command: str = DEFAULT_COMMAND) -> None:
        self.directory = Path(directory)
        self.command = command
        self._add_hint = f"add the CA of the internal mail server with '{command} add FILE'"
        self._lock = threading.Lock()
        self._cached: tuple[_Stamp, ssl.SSLContext] | None = None

    def add(self, data: bytes, *, alias: str | None = None, source: str = "input") -> builtins.list[TrustEntry]:
        """Store every certificate in ``data`` (PEM, one or several, or DER) and return the new entries.

        Each certificate of a bundle gets its own file: ``alias``, ``alias-2``, ... or, without ``alias``, a
        name derived from its common name (or fingerprint). Nothing is stored unless every certificate is
        accepted. Raises TrustError when ``data`` holds no certificate or one that cannot be a trust anchor (a
        leaf issued by a CA, an expired certificate), ConfigurationError for a bad or taken alias or a
        certificate that is already stored.
        """
        certificates = load_certificates(data, source=source)
        if alias is not None:
            validate_alias(alias)
        loaded, problems = self._scan()
        taken = {item.entry.alias for item in loaded} | {path.name[: -len(_SUFFIX)] for path, _ in problems}
        stored_by_fingerprint = {item.entry.info.fingerprint: item.entry.alias for item in loaded}
        planned: list[tuple[str, x509.Certificate, CertificateInfo]] = []
        for index, cert in enumerate(certificates, start=1):
            info = describe(cert)
            where = f"the certificate in '{source}'"
            if len(certificates) > 1:
                where = f"certificate {index} of {len(certificates)} in '{source}'"
            _check_anchor(info, where)
            if info.fingerprint in stored_by_fingerprint:
                existing = stored_by_fingerprint[info.fingerprint]
                raise ConfigurationError(
                    f"{where} ('{info.subject}') is already in the trust store as '{existing}'",
                    hint="it is trusted already; to rename it, remove "
                    f"'{existing}' first with '{self.command} remove {existing}'",
                )
            if any(other.fingerprint == info.fingerprint for _, _, other in planned):
                raise ConfigurationError(
                    f"{where} ('{info.subject}') appears twice in '{source}'",
                    hint="remove the repeated certificate from the file",
                )
            if alias is not None:
                name = validate_alias(alias if index == 1 else f"{alias}-{index}")
                if name in taken:
                    raise ConfigurationError(
                        f"alias '{name}' is already used in the trust store '{self.directory}'",
                        hint="choose another alias, or remove the old entry first",
                    )
            else:
                name = _unique(_default_alias(cert, info), taken)
            taken.add(name)
            planned.append((name, cert, info))
        self._write_all(planned)
        return [TrustEntry(name, info) for name, _, info in planned]

    def list(self) -> builtins.list[TrustEntry]:
        """All entries sorted by alias; raises TrustError naming every file that is not one readable
        certificate (the store is not trusted partially)."""
        return [item.entry for item in self._load_checked()]

    def certificates(self) -> builtins.list[tuple[TrustEntry, x509.Certificate]]:
        """All entries with their parsed certificates, sorted by alias; raises as list()."""
        return [(item.entry, item.certificate) for item in self._load_checked()]

    def get(self, alias_or_fingerprint: str) -> tuple[TrustEntry, x509.Certificate]:
        """The entry with this alias, SHA-256 fingerprint, or unique fingerprint prefix (8 hex digits or more,
        as the listings show it, with or without ':' and a trailing '…').

        Raises ConfigurationError when there is none (listing the aliases) or the prefix is ambiguous, TrustError
        when the alias names an unreadable file.
        """
        item = self._find(alias_or_fingerprint, allow_prefix=True)
        return item.entry, item.certificate

    def expiring_within(self, days: float, now: datetime | None = None) -> builtins.list[TrustEntry]:
        """Entries that are expired or expire within ``days`` days (to warn about them); raises as list()."""
        return [entry for entry in self.list() if entry.info.expires_within(days, now)]

    def remove(self, alias_or_fingerprint: str) -> TrustEntry:
        """Delete the entry with this alias or SHA-256 fingerprint and return it.

        Raises ConfigurationError when there is none (listing the aliases), TrustError when the alias names an
        unreadable file (delete that by hand).
        """
        target = self._find(alias_or_fingerprint, allow_prefix=False).entry
        path = self._path(target.alias)
        try:
            path.unlink()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot delete '{path}': {exc.strerror}",
                hint="check the permissions of the trust store folder",
            ) from exc
        return target

    def pem_bundle(self) -> str:
        """All certificates of the store as one PEM text ("" when empty). Raises TrustError for unreadable files."""
        return "".join(item.pem for item in self._load_checked())

    def ssl_context(self) -> ssl.SSLContext:
        """A TLS client context (TLS >= 1.2, certificate and host name required) trusting only this store.

        The context is cached and rebuilt only when the folder changed; it is shared, so callers must not
        modify it. Raises TrustError when the store is empty or holds an unreadable file.
        """
        stamp = self._stamp()
        with self._lock:
            if self._cached is not None and self._cached[0] == stamp:
                return self._cached[1]
            loaded = self._load_checked()
            if not loaded:
                raise TrustError(
                    "the backend trust store is empty, so no TLS server can be trusted", hint=self._add_hint
                )
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.verify_mode = ssl.CERT_REQUIRED
            context.check_hostname = True
            # A stored intermediate CA is a trust anchor of its own: chains need not reach a self-signed root.
            context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
            try:
                context.load_verify_locations(cadata="".join(item.pem for item in loaded))
            except ssl.SSLError as exc:
                raise TrustError(
                    f"OpenSSL refused the certificates of the trust store '{self.directory}': {exc.reason}",
                    hint="remove the entry added last and add it again from the original file",
                ) from exc
            self._cached = (stamp, context)
            return context

    # --- internals -----------------------------------------------------------------------------------------

    def _find(self, alias_or_fingerprint: str, *, allow_prefix: bool) -> _Loaded:
        key = alias_or_fingerprint.strip()
        loaded, problems = self._scan()
        target = next((item for item in loaded if item.entry.alias == key), None)
        if target is None:
            for path, reason in problems:
                if path.name == key + _SUFFIX:
                    raise TrustError(f"trust store file '{path}' {reason}", hint="delete the file by hand")
            try:
                wanted = parse_fingerprint(key)
            except ConfigurationError:
                wanted = ""
            target = next((item for item in loaded if item.entry.info.fingerprint == wanted), None)
        if target is None and allow_prefix:
            prefix = key.rstrip("….").replace(":", "").upper()
            if len(prefix) >= _MIN_PREFIX and _HEX.match(prefix):
                matches = [item for item in loaded if item.entry.info.fingerprint.replace(":", "").startswith(prefix)]
                if len(matches) > 1:
                    raise ConfigurationError(
                        f"fingerprint prefix '{key}' matches {len(matches)} certificates: "
                        + ", ".join(item.entry.alias for item in matches),
                        hint="give the alias or the full SHA-256 fingerprint",
                    )
                target = matches[0] if matches else None
        if target is None:
            aliases = ", ".join(item.entry.alias for item in loaded)
            raise ConfigurationError(
                f"the trust store '{self.directory}' has no certificate with alias or fingerprint '{key}'",
                hint=f"its aliases are: {aliases}" if aliases else "the trust store is empty",
            )
        return target

    def _path(self, alias: str) -> Path:
        return self.directory / f"{alias}{_SUFFIX}"

    def _files(self) -> builtins.list[Path]:
        try:
            return sorted(
                path
                for path in self.directory.iterdir()
                if path.name.endswith(_SUFFIX) and not path.name.startswith(".") and path.is_file()
            )
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise TrustError(
                f"cannot read the trust store folder '{self.directory}': {exc.strerror}",
                hint="check that the folder belongs to the user running postbridge",
            ) from exc

    def _scan(self) -> tuple[builtins.list[_Loaded], builtins.list[tuple[Path, str]]]:
        """Readable entries and the files that are not (with the reason), without raising for the latter."""
        loaded: list[_Loaded] = []
        problems: list[tuple[Path, str]] = []
        for path in self._files():
            alias = path.name[: -len(_SUFFIX)]
            if not _ALIAS.match(alias):
                problems.append((path, "has a name that is not a valid alias"))
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                problems.append((path, f"cannot be read ({exc.strerror})"))
                continue
            try:
                certificates = load_certificates(data, source=str(path))
                if len(certificates) != 1:
                    raise TrustError(f"holds {len(certificates)} certificates instead of one")
                info = describe(certificates[0])
            except TrustError as exc:
                problems.append((path, f"is not one readable certificate ({exc.message})"))
                continue
            pem = cert_pem(certificates[0]).decode("ascii")
            loaded.append(_Loaded(TrustEntry(alias, info), pem, certificates[0]))
        loaded.sort(key=lambda item: item.entry.alias)
        return loaded, problems

    def _load_checked(self) -> builtins.list[_Loaded]:
        loaded, problems = self._scan()
        if problems:
            listing = "; ".join(f"'{path}' {reason}" for path, reason in problems)
            raise TrustError(
                f"the trust store '{self.directory}' has unusable files: {listing}",
                hint="delete or replace them; " + self._add_hint,
            )
        return loaded

    def _stamp(self) -> _Stamp:
        try:
            folder = self.directory.stat().st_mtime_ns
        except OSError:
            return (-1, ())
        files: list[tuple[str, int, int, int]] = []
        for path in self._files():
            try:
                status = path.stat()
            except OSError:
                continue
            files.append((path.name, status.st_mtime_ns, status.st_size, status.st_ino))
        return (folder, tuple(files))

    def _write_all(self, planned: builtins.list[tuple[str, x509.Certificate, CertificateInfo]]) -> None:
        written: list[Path] = []
        try:
            private_dir(self.directory)
            for name, cert, _ in planned:
                path = self._path(name)
                atomic_write(path, cert_pem(cert))
                written.append(path)
        except BaseException as exc:
            for path in written:
                path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise ConfigurationError(
                    f"cannot write to the trust store '{self.directory}': {exc.strerror}",
                    hint="check free space and the permissions of the folder",
                ) from exc
            raise


def _check_anchor(info: CertificateInfo, where: str) -> None:
    if not (info.is_ca or info.self_signed):
        raise TrustError(
            f"{where} ('{info.subject}') is a server certificate issued by '{info.issuer}', so it cannot "
            "be a trust anchor",
            hint=f"add the certificate of the CA that issued it ('{info.issuer}') instead",
        )
    if info.expires_within(0):
        raise TrustError(
            f"{where} ('{info.subject}') expired on {info.not_after:%Y-%m-%d}",
            hint="get the current certificate from the administrator of the mail server",
        )


def _default_alias(cert: x509.Certificate, info: CertificateInfo) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = names[0].value if names else ""
    if isinstance(common_name, bytes):
        common_name = common_name.decode("utf-8", "replace")
    alias = re.sub(r"[^a-z0-9._-]+", "-", common_name.lower())[:56].strip(".-")
    return alias if alias else info.fingerprint.replace(":", "")[:16].lower()


def _unique(base: str, taken: set[str]) -> str:
    if base not in taken:
        return base
    number = 2
    while f"{base}-{number}" in taken:
        number += 1
    return f"{base}-{number}"
