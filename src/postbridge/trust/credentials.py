"""The encrypted credential store: named passwords and OAuth2 grants that mail channels refer to by name.

A channel says ``credential = "corp-mailbox"``; :meth:`CredentialStore.resolve` turns that name into the user and
the secret to log in with: the password of a ``password`` entry, or for an ``oauth2`` entry an access token got
with its refresh token (and cached until shortly before it expires).

On disk (``HOME/credentials.json.enc``, one file for all entries, mode 0600, always replaced atomically)::

    magic      8 bytes   b"PBCRED\\0" and the format version (1)
    key id     8 bytes   SHA-256("postbridge credential key id\\0" + key)[:8]: tells a wrong key from a damaged
                         file and says nothing usable about the key
    nonce     12 bytes   random, new on every write
    sealed     rest      AES-256-GCM of the JSON document {"version": 1, "entries": {name: {...}}}, the 16 header
                         bytes (magic + key id) as associated data

The whole document is sealed at once, so names, users and their order are hidden as well and no entry can be
swapped, dropped or replayed on its own. The key (32 random bytes, base64 wherever it is written) is kept apart
from the data; precedence: ``key_file`` (``--key-file PATH``) > ``POSTBRIDGE_CREDENTIALS_KEY`` > the key file
``HOME/credentials.key``. A key file is created (mode 0600, never overwritten) on the first write when no store
exists yet; a key file that others may read is refused. Writes hold ``credentials.json.enc.lock`` (flock), so
the CLI and a running flow never lose each other's changes, and concurrent OAuth2 refreshes are serialised (a
rotating refresh token is used once).

OAuth2 refresh (:mod:`postbridge.trust.oauth2`): the grant is asked for under the store's lock, and a rotated
refresh token from the answer replaces the stored one.

This module must not print, log or put a secret (password, client secret, refresh or access token, key) into a
repr, a log record or an exception message, must not write anything unencrypted, and must never hand out data it
could not authenticate: a wrong key or one changed byte is an error.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from postbridge.errors import (
    ConfigurationError,
)
from postbridge.home import atomic_write, private_dir
from postbridge.mail.settings import Credentials
from postbridge.trust.oauth2 import check_token_url, refresh_grant

log = logging.getLogger(__name__)
T = TypeVar("T")

KEY_ENV = "POSTBRIDGE_CREDENTIALS_KEY"
STORE_FILE = "credentials.json.enc"
KEY_FILE = "credentials.key"
EXPIRY_MARGIN = 60.0  # seconds before expiry at which a cached access token is no longer handed out

_MAGIC = b"PBCRED\x00"
_VERSION = 1
_HEADER = len(_MAGIC) + 1 + 8
_NONCE = 12
_KEY_HINT = (
    f"give the key used when it was created ({KEY_ENV}, --key-file PATH or HOME/{KEY_FILE}); if you are sure it "
    "is the right key, the file was damaged: restore it from a backup"
)


def _now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class PasswordEntry:
    """A user and a password. ``repr`` shows neither the password nor anything derived from it."""

    kind: ClassVar[str] = "password"
    name: str
    user: str
    password: str = field(repr=False)
    created: str = ""
    updated: str = ""


@dataclass(frozen=True)
class OAuth2Entry:
    """A user and an OAuth2 refresh-token grant (for ``xoauth2`` / ``oauthbearer``); secrets stay out of ``repr``.

    ``access_token`` / ``access_token_expires`` (epoch seconds, 0 = none) cache the last token got.
    """

    kind: ClassVar[str] = "oauth2"
    name: str
    user: str
    token_url: str
    client_id: str
    refresh_token: str = field(repr=False)
    client_secret: str = field(default="", repr=False)
    scope: str = ""
    created: str = ""
    updated: str = ""
    access_token: str = field(default="", repr=False)
    access_token_expires: float = 0.0


Entry = PasswordEntry | OAuth2Entry


def summary(entry: Entry) -> dict[str, str]:
    """What ``list``, ``show`` and ``--json`` may print: name, kind, user and dates — never a secret."""
    return {
        "name": entry.name,
        "kind": entry.kind,
        "user": entry.user,
        "created": entry.created,
        "updated": entry.updated,
    }


def validate_name(name: str) -> str:
    """Return ``name`` if it can name an entry (1-64 of ``[A-Za-z0-9._-]``, no leading '.'); else ConfigurationError."""
    valid = 0 < len(name) <= 64 and not name.startswith(".")
    if not valid or any(not (char.isascii() and (char.isalnum() or char in "._-")) for char in name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise ConfigurationError(
            f"credential name '{shown}' is not valid: use 1 to 64 letters, digits, '.', '_' or '-', "
            "not starting with '.'",
            hint="choose a name such as 'corp-mailbox'",
        )
    return name


def check_secret(value: str, what: str, name: str) -> str:
    """Refuse an empty secret or one with a line break or NUL (it would smuggle protocol commands); the value is
    never quoted. Raises ConfigurationError."""
    if not value:
        raise ConfigurationError(f"the {what} of credential '{name}' is empty", hint=f"give a non-empty {what}")
    if any(char in value for char in "\r\n\x00"):
        raise ConfigurationError(
            f"the {what} of credential '{name}' contains a line break or NUL",
            hint=f"give the {what} on one line (with --*-stdin only the first line is read)",
        )
    return value


class StoreKey:
    """The store's 32-byte key and where it came from; ``repr`` shows the source and key id only."""

    def __init__(self, secret: bytes, source: str) -> None:
        if len(secret) != 32:
            raise ConfigurationError(
                f"the credential store key from {source} is {len(secret)} bytes long, not 32",
                hint="give base64 of 32 random bytes, e.g. from 'head -c 32 /dev/urandom | base64'",
            )
        self._secret = secret
        self.source = source
        self.key_id = hashlib.sha256(b"postbridge credential key id\x00" + secret).digest()[:8]

    @classmethod
    def generate(cls, source: str) -> StoreKey:
        return cls(os.urandom(32), source)

    @classmethod
    def parse(cls, text: str, source: str) -> StoreKey:
        """Decode base64 (standard or URL-safe) text; raise ConfigurationError naming ``source``, never the text."""
        cleaned = "".join(text.split()).replace("-", "+").replace("_", "/")
        try:
            secret = base64.b64decode(cleaned, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(
                f"the credential store key from {source} is not base64",
                hint="give base64 of 32 random bytes, e.g. from 'head -c 32 /dev/urandom | base64'",
            ) from None
        return cls(secret, source)

    def encoded(self) -> str:
        return base64.b64encode(self._secret).decode("ascii")

    def aead(self) -> AESGCM:
        return AESGCM(self._secret)

    def __repr__(self) -> str:
        return f"StoreKey(source={self.source!r}, key_id={self.key_id.hex()!r})"


def seal(key: StoreKey, document: bytes) -> bytes:
    """Encrypt ``document`` into the file format described above, with a fresh random nonce."""
    header = _MAGIC + bytes([_VERSION]) + key.key_id
    nonce = os.urandom(_NONCE)
    return header + nonce + key.aead().encrypt(nonce, document, header)


def unseal(key: StoreKey, blob: bytes, source: str) -> bytes:
    """Decrypt and authenticate a sealed store. Raises ConfigurationError for a file that is not a store, a
    format from a newer postbridge, a wrong key or a changed or truncated file."""
    if not blob.startswith(_MAGIC):
        raise ConfigurationError(
            f"'{source}' is not a postbridge credential store (unknown format)",
            hint="restore it from a backup, or move it away and add the credentials again",
        )
    if len(blob) < _HEADER + _NONCE + 16:
        raise ConfigurationError(
            f"the credential store '{source}' is truncated ({len(blob)} bytes)",
            hint="restore it from a backup, or move it away and add the credentials again",
        )
    version = blob[len(_MAGIC)]
    if version != _VERSION:
        raise ConfigurationError(
            f"the credential store '{source}' has format version {version}; this postbridge reads {_VERSION}",
            hint="use the postbridge version that wrote it",
        )
    header, nonce, sealed = blob[:_HEADER], blob[_HEADER : _HEADER + _NONCE], blob[_HEADER + _NONCE :]
    stored_id = header[len(_MAGIC) + 1 :]
    if stored_id != key.key_id:
        raise ConfigurationError(
            f"the credential store cannot be decrypted with this key: '{source}' was written with key id "
            f"{stored_id.hex()}, the key from {key.source} has key id {key.key_id.hex()}",
            hint=_KEY_HINT,
        )
    try:
        return key.aead().decrypt(nonce, sealed, header)
    except InvalidTag:
        raise ConfigurationError(
            f"the credential store '{source}' fails its integrity check: it was changed or damaged after "
            "postbridge wrote it (key id matches)",
            hint="restore it from a backup, or move it away and add the credentials again",
        ) from None


def _entry_to_json(entry: Entry) -> dict[str, Any]:
    return {"kind": entry.kind, **dataclasses.asdict(entry)}


def _entry_from_json(name: str, data: Any, source: str) -> Entry:
    try:
        fields = {key: value for key, value in data.items() if key != "kind"}
        if data["kind"] == PasswordEntry.kind:
            return PasswordEntry(**fields)
        if data["kind"] == OAuth2Entry.kind:
            return OAuth2Entry(**fields)
    except (AttributeError, KeyError, TypeError):
        pass
    raise ConfigurationError(
        f"credential '{name}' in '{source}' is not understood by this postbridge version",
        hint="use the postbridge version that wrote it, or remove the entry and add it again",
    )


# -- OAuth2 refresh-token grant --------------------------------------------------------------------------------


class CredentialStore:
    """The credential store of one home folder (nothing is read or created until first used)."""

    def __init__(
        self,
        home: Path,
        *,
        key_file: Path | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        token_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.home = Path(home)
        self.path = self.home / STORE_FILE
        self._key_file = Path(key_file) if key_file is not None else None
        self._environ = os.environ if environ is None else environ
        self._clock = clock
        self._token_context = token_context
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"CredentialStore({str(self.path)!r})"

    # -- reading -------------------------------------------------------------------------------------------------

    def list(self) -> list[Entry]:
        """All entries sorted by name (empty when there is no store yet). Raises ConfigurationError (key, file)."""
        return [entry for _, entry in sorted(self._load().items())]

    def get(self, name: str) -> Entry:
        """The entry called ``name``; ConfigurationError naming the known ones when there is none."""
        entries = self._load()
        if name not in entries:
            known = ", ".join(sorted(entries)) or "none"
            raise ConfigurationError(
                f"no credential named '{name}' in '{self.path}' (known: {known})",
                hint=f"add it with 'postbridge credentials add {name} --user USER'",
            )
        return entries[name]

    def resolve(self, name: str) -> Credentials:
        """User and secret for a mail login: the password, or a current OAuth2 access token.

        Raises ConfigurationError (unknown name, key, file), and for OAuth2 entries what :meth:`access_token`
        raises.
        """
        entry = self.get(name)
        if isinstance(entry, PasswordEntry):
            return Credentials(entry.user, entry.password)
        return Credentials(entry.user, self.access_token(entry), token=True)

    # -- changing ------------------------------------------------------------------------------------------------

    def add(self, entry: Entry, *, replace: bool = False) -> Entry:
        """Store ``entry`` (dates set here) and return it; ConfigurationError when the name is taken and not
        ``replace``, when a value is invalid, or for the key and file errors of :meth:`list`."""
        validate_name(entry.name)
        if isinstance(entry, PasswordEntry):
            check_secret(entry.password, "password", entry.name)
        else:
            check_token_url(entry.token_url)
            check_secret(entry.refresh_token, "refresh token", entry.name)
            if entry.client_secret:
                check_secret(entry.client_secret, "client secret", entry.name)
        stamp = _now_text()

        def change(entries: dict[str, Entry]) -> Entry:
            old = entries.get(entry.name)
            if old is not None and not replace:
                raise ConfigurationError(
                    f"a credential named '{entry.name}' already exists ({old.kind}, user '{old.user}')",
                    hint="choose another name, remove it first, or pass --replace",
                )
            stored = dataclasses.replace(entry, created=old.created if old else stamp, updated=stamp)
            entries[entry.name] = stored
            return stored

        return self._update(change)

    def remove(self, name: str) -> Entry:
        """Delete the entry called ``name`` and return it; ConfigurationError when there is none."""

        def change(entries: dict[str, Entry]) -> Entry:
            if name not in entries:
                raise ConfigurationError(
                    f"no credential named '{name}' in '{self.path}'", hint="see 'postbridge credentials list'"
                )
            return entries.pop(name)

        return self._update(change)

    def access_token(self, entry: OAuth2Entry | str) -> str:
        """A current access token for an OAuth2 entry (by entry or name): the cached one while it is valid for
        more than EXPIRY_MARGIN seconds, else a new one from the token endpoint (a rotated refresh token is
        stored). Raises ConfigurationError (unknown or non-OAuth2 name, bad URL), AuthenticationError (grant
        refused), NetworkError / PostbridgeTimeout / TrustError (endpoint unreachable) and ProtocolError."""
        name = entry if isinstance(entry, str) else entry.name
        cached = self._load().get(name)  # a valid cached token needs no lock and no write
        if isinstance(cached, OAuth2Entry) and self._cached_token(cached):
            return cached.access_token

        def change(entries: dict[str, Entry]) -> str:
            current = entries.get(name)
            if not isinstance(current, OAuth2Entry):
                raise ConfigurationError(
                    f"credential '{name}' is {'missing' if current is None else 'not an OAuth2 entry'}",
                    hint=f"add it with 'postbridge credentials add-oauth2 {name} ...'",
                )
            if self._cached_token(current):  # another process may have refreshed while we waited for the lock
                return current.access_token
            now = self._clock()
            grant = refresh_grant(
                token_url=current.token_url,
                client_id=current.client_id,
                client_secret=current.client_secret,
                refresh_token=current.refresh_token,
                scope=current.scope,
                what=f"credential '{name}'",
                context=self._token_context,
                timeout=self._timeout,
            )
            entries[name] = dataclasses.replace(
                current,
                access_token=grant.access_token,
                access_token_expires=now + grant.expires_in if grant.expires_in else 0.0,
                refresh_token=grant.refresh_token or current.refresh_token,
            )
            log.info(
                "got an access token for credential '%s' from %s (%s%s)",
                name,
                current.token_url,
                f"valid {grant.expires_in:.0f} s" if grant.expires_in else "no expiry given, not cached",
                ", refresh token rotated" if grant.refresh_token else "",
            )
            return grant.access_token

        return self._update(change)

    # -- internals -----------------------------------------------------------------------------------------------

    def _cached_token(self, entry: OAuth2Entry) -> bool:
        return bool(entry.access_token) and entry.access_token_expires - EXPIRY_MARGIN > self._clock()

    @property
    def key_file(self) -> Path | None:
        """The key file in use (it may not exist yet), or None when the key comes from the environment."""
        if self._key_file is not None:
            return self._key_file
        if self._environ.get(KEY_ENV):
            return None
        return self.home / KEY_FILE

    def _key(self, *, create: bool) -> StoreKey:
        path = self.key_file
        if path is None:
            return StoreKey.parse(self._environ[KEY_ENV], f"${KEY_ENV}")
        source = f"key file '{path}'"
        try:
            status = path.stat()
        except FileNotFoundError:
            if not create:
                raise ConfigurationError(
                    f"the credential store '{self.path}' exists but its key file '{path}' does not",
                    hint=_KEY_HINT,
                ) from None
            return self._create_key_file(path, source)
        except OSError as exc:
            raise ConfigurationError(f"cannot read the {source}: {exc.strerror}") from exc
        if status.st_mode & 0o077:
            raise ConfigurationError(
                f"the {source} may be read by other users (mode {status.st_mode & 0o777:o})",
                hint=f"run 'chmod 600 {path}'",
            )
        try:
            return StoreKey.parse(path.read_text(encoding="ascii"), source)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"cannot read the {source}: {exc}", hint=_KEY_HINT) from exc

    def _create_key_file(self, path: Path, source: str) -> StoreKey:
        """Write a new key without ever replacing an existing file (temporary file + link)."""
        key = StoreKey.generate(source)
        if path.parent == self.home:
            private_dir(self.home)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="ascii") as handle:
                    handle.write(key.encoded() + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                os.link(tmp, path)
            finally:
                os.unlink(tmp)
        except FileExistsError:
            return self._key(create=False)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create the {source}: {exc.strerror}",
                hint=f"choose another place with --key-file, or give the key in {KEY_ENV}",
            ) from exc
        log.info("created the credential store key file %s (keep a copy apart from the store)", path)
        return key

    def _load(self, key: StoreKey | None = None) -> dict[str, Entry]:
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigurationError(f"cannot read the credential store '{self.path}': {exc.strerror}") from exc
        plain = unseal(key or self._key(create=False), blob, str(self.path))
        try:
            document = json.loads(plain)
            raw_entries = document["entries"]
            return {name: _entry_from_json(name, data, str(self.path)) for name, data in raw_entries.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigurationError(
                f"the credential store '{self.path}' decrypts but holds no entries table",
                hint="restore it from a backup, or move it away and add the credentials again",
            ) from None

    def _update(self, change: Callable[[dict[str, Entry]], T]) -> T:
        with self._locked():
            key = self._key(create=not self.path.exists())
            entries = self._load(key)
            result = change(entries)
            document = {"version": _VERSION, "entries": {name: _entry_to_json(e) for name, e in entries.items()}}
            atomic_write(self.path, seal(key, json.dumps(document, sort_keys=True).encode("utf-8")))
            return result

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        private_dir(self.home)
        fd = os.open(self.path.with_name(STORE_FILE + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
