"""Reading a flows file for the runtime and opening a :class:`~postbridge.runtime.engine.Runtime` with its store and
targets: what ``postbridge run``, ``flows check|status``, the cockpit and the demo share.

Owns: resolving credential names through the home's credential store (or, with ``resolve_secrets=False``, only
checking that they exist, never fetching a token), checking every target while the file is read, and closing the
targets and the store when the runtime is done. Must not: schedule or poll (engine.py does), or print.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from postbridge.mail.settings import Credentials
from postbridge.runtime.config import RuntimeConfig
from postbridge.runtime.engine import Runtime
from postbridge.runtime.flows_file import load_flows
from postbridge.runtime.metrics import Metrics
from postbridge.runtime.store import open_store
from postbridge.runtime.targets import Target, build_target
from postbridge.trust.credentials import CredentialStore, OAuth2Entry


class NamesOnly:
    """A credential resolver that checks a name exists and never fetches a token (to read a flows file)."""

    def __init__(self, store: CredentialStore) -> None:
        self.store = store

    def resolve(self, name: str) -> Credentials:
        entry = self.store.get(name)
        return Credentials(entry.user, "(not fetched)", token=isinstance(entry, OAuth2Entry))


def read_flows(home: Path, path: Path, *, resolve_secrets: bool) -> RuntimeConfig:
    """The flows file at ``path`` with credential names looked up in ``home``'s credential store, every target
    checked. Raises FlowsFileError listing every problem (file, line, fix), ConfigurationError for an unreadable
    file or credential store."""
    store = CredentialStore(home)
    credentials: Any = store if resolve_secrets else NamesOnly(store)

    def check_target(table: Mapping[str, Any], source: str) -> None:
        build_target(table, source=source, home=home, credentials=credentials).close()

    return load_flows(path, credentials=credentials, check_target=check_target)


@contextlib.contextmanager
def opened_runtime(
    home: Path, config: RuntimeConfig, *, metrics: Metrics | None = None, worker: str | None = None
) -> Iterator[Runtime]:
    """A runtime for the enabled flows of ``config`` with its state store and targets open for the block; they are
    closed afterwards. Raises what opening the store raises (ConfigurationError, NetworkError) and what building a
    target raises (ConfigurationError)."""
    store = open_store(config.state, home=home)
    targets: dict[str, Target] = {}
    try:
        credentials = CredentialStore(home)
        for flow in config.flows:
            if flow.enabled:
                targets[flow.name] = build_target(
                    flow.target, source=flow.target_source, home=home, credentials=credentials
                )
        yield Runtime(config, store, targets, metrics or Metrics(), owner=worker)
    finally:
        for target in targets.values():
            target.close()
        store.close()
