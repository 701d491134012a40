"""Reading a flows file: :func:`load_flows` checks every table and key and collects every problem with its line.

Owns: the walk over the TOML document (``[runtime]``, each ``[[flow]]`` with ``[flow.sender]``, ``[flow.retry]`` and
``[flow.target]``), the line of each problem (``runtime/toml_lines.py``), "did you mean" hints, relative paths
resolved against the file's folder, and handing the channel keys to the mail adapter's own
:func:`~postbridge.mail.settings.channel_from_mapping`. The values it builds are in :mod:`postbridge.runtime.config`.

Must not: do network I/O, touch a state database, know how a target works (``check_target`` does), or quote a
password or token in a message.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from postbridge.addresses import HostPort, parse_host_port
from postbridge.errors import ConfigurationError, PostbridgeError
from postbridge.mail.poller import Pop3PostProcessing, PostProcessing, SenderSettings
from postbridge.mail.settings import (
    ChannelSettings,
    CredentialResolver,
    Credentials,
    channel_from_mapping,
    parse_bool,
    parse_enum,
    parse_seconds,
)
from postbridge.runtime.config import (
    CHANNEL_KEYS,
    FLOW_KEYS,
    MODES,
    PROTOCOLS,
    RETRY_KEYS,
    RUNTIME_KEYS,
    SENDER_KEYS,
    TARGET_KINDS,
    FlowConfig,
    FlowsFileError,
    Problem,
    RetryPolicy,
    RuntimeConfig,
)
from postbridge.runtime.toml_lines import TomlLines, TomlPath

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_POP3_WITHOUT = ("folder", "selection", "archive_folder", "quarantine_folder")  # POP3 has one mailbox, no folders
_TARGET_PATHS = ("path", "ca_file")


class _CredentialFailed(ConfigurationError):
    """The credential resolver refused a name (wraps its error so that it lands on the ``credential`` line)."""

    def __init__(self, cause: PostbridgeError) -> None:
        super().__init__(cause.message, hint=cause.hint)


def load_flows(
    path: Path,
    *,
    credentials: CredentialResolver | None = None,
    check_target: Callable[[Mapping[str, Any], str], None] | None = None,
) -> RuntimeConfig:
    """Read and validate the flows file at ``path``.

    ``credentials`` resolves ``credential = "NAME"`` in ``[flow.sender]``; ``check_target(table, source)`` validates
    a flow's ``[flow.target]`` (called only for flows whose other settings are valid). Raises ConfigurationError
    when the file cannot be read, and FlowsFileError with every problem found (including what the resolver and
    ``check_target`` raised) otherwise.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read the flows file '{path}': {exc.strerror or exc}",
            hint="give the path of a flows file; 'postbridge flows example' prints one to start from",
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigurationError(
            f"the flows file '{path}' is not UTF-8 text (byte {exc.start})", hint="save it as UTF-8"
        ) from exc
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FlowsFileError(path, [_syntax_problem(exc, text)]) from exc
    reader = _Reader(path, TomlLines(text), credentials, check_target)
    config = reader.read(document)
    if reader.problems or config is None:
        raise FlowsFileError(path, reader.problems)
    return config


def _syntax_problem(exc: tomllib.TOMLDecodeError, text: str) -> Problem:
    message = str(exc)
    where = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if where:
        line: int | None = int(where.group(1))
        message = message[: where.start()]
        hint = f"fix the TOML syntax at line {line}, column {where.group(2)} (text needs quotes, flows are [[flow]])"
    else:
        line = max(1, text.count("\n") + (0 if text.endswith("\n") else 1))
        message = re.sub(r"\s*\(at end of document\)$", "", message)
        hint = "the file ends in the middle of a value: close the string, array or table"
    return Problem(line, f"not valid TOML: {message}", hint)


@dataclass
class _Table:
    """A table being read: its data, its path in the document (for line numbers) and its name in messages."""

    data: dict[str, Any]
    path: TomlPath
    label: str


def _guess(value: str, allowed: Iterable[str]) -> str:
    close = difflib.get_close_matches(value, list(allowed), n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def _choice_hint(key: str, value: str, allowed: tuple[str, ...], example: str = "") -> str:
    close = difflib.get_close_matches(value, allowed, n=1)
    if close:
        return f'did you mean "{close[0]}"? write {key} = "{close[0]}"'
    return f'e.g. {key} = "{example or allowed[0]}"'


class _Reader:
    """Walks the parsed document once, collecting problems instead of stopping at the first."""

    def __init__(
        self,
        path: Path,
        lines: TomlLines,
        credentials: CredentialResolver | None,
        check_target: Callable[[Mapping[str, Any], str], None] | None,
    ) -> None:
        self.path = path
        self.folder = path.absolute().parent
        self.lines = lines
        self.credentials = credentials
        self.check_target = check_target
        self.problems: list[Problem] = []

    # -- reporting -----------------------------------------------------------------------------------------------

    def problem(self, table: _Table, key: str | None, message: str, hint: str = "") -> None:
        """A problem on the key's line if the key is in the file, else on the table's header line."""
        line = self.lines.line(*table.path, key) if key is not None else self.lines.line(*table.path)
        self.problems.append(Problem(line, f"{table.label}: {message}", hint))

    def error(self, table: _Table, exc: PostbridgeError) -> None:
        """An error of the mail adapter, placed on the line of the key it names first (else the table's header)."""
        message = exc.message.removeprefix(f"{table.label}: ")
        first = re.match(r"'?(\w+)", message)
        mentioned = [key for key in table.data if re.search(rf"\b{re.escape(key)}\b", message)]
        named = ([first.group(1)] if first else []) + mentioned
        key = next((name for name in named if name in table.data), None)
        hint = exc.hint or f"fix {key or 'the table'}; 'postbridge flows example' shows every key"
        if key in ("binding", "keystore"):
            hint = exc.hint or f"fix {key}: a relative path starts at the folder of {self.path.name}"
        wrong_choice = re.search(r"(\w+) '([^']*)' is not one of: (.+)$", message)
        if not exc.hint and wrong_choice:  # parse_enum lists the allowed values but names no fix
            name, value, allowed = wrong_choice.groups()
            default = {spec.name: spec.default for spec in dataclasses.fields(ChannelSettings)}.get(name)
            example = default.value if isinstance(default, enum.Enum) else ""  # never suggest "off" for protection
            hint = _choice_hint(name, value, tuple(allowed.split(", ")), example)
        self.problem(table, key, message, hint)

    # -- values --------------------------------------------------------------------------------------------------

    def unknown_keys(self, table: _Table, allowed: Iterable[str]) -> None:
        known = sorted(allowed)
        for key in table.data:
            if key not in known:
                self.problem(table, key, f"unknown key '{key}'", f"{_guess(key, known)}allowed: {', '.join(known)}")

    def subtable(self, parent: _Table, key: str, header: str, *, example: str, required: bool = True) -> _Table | None:
        value = parent.data.get(key)
        if value is None and required:
            self.problem(parent, None, f"[{header}] is missing", f"add it, e.g. {example}")
        elif value is not None and not isinstance(value, dict):
            self.problem(parent, key, f"'{key}' must be a table, not {_type(value)}", f"write {example}")
        elif isinstance(value, dict):
            label = f"[{header}] of {parent.label}" if parent.path else f"[{header}]"
            return _Table(value, (*parent.path, key), label)
        return None

    def string(self, table: _Table, key: str, default: str, *, example: str) -> str | None:
        value = table.data.get(key, default)
        if isinstance(value, str):
            return value
        self.problem(table, key, f"{key} must be a string, not {_type(value)}", f"e.g. {example}")
        return None

    def choice(self, table: _Table, key: str, allowed: tuple[str, ...], default: str) -> str | None:
        value = self.string(table, key, default, example=f'{key} = "{allowed[0]}"')
        if value is None or value in allowed:
            return value
        self.problem(
            table, key, f"{key} '{value}' is not one of: {', '.join(allowed)}", _choice_hint(key, value, allowed)
        )
        return None

    def seconds(self, table: _Table, key: str, default: float) -> float | None:
        value = table.data.get(key, default)
        try:
            number = parse_seconds(value if not isinstance(value, bool) else str(value).lower(), key)
        except ConfigurationError as exc:
            self.problem(table, key, exc.message, f"e.g. {key} = {default:g}")
            return None
        if 0 < number < math.inf:
            return number
        self.problem(table, key, f"{key} {number:g} is not above 0", f"e.g. {key} = {default:g}")
        return None

    def count(self, table: _Table, key: str, default: int) -> int | None:
        value = table.data.get(key, default)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        self.problem(table, key, f"{key} {value!r} is not a whole number of at least 1", f"e.g. {key} = {default}")
        return None

    def boolean(self, table: _Table, key: str, default: bool) -> bool | None:
        try:
            return parse_bool(table.data.get(key, default), key)
        except ConfigurationError as exc:
            self.problem(table, key, exc.message, f"e.g. {key} = {str(default).lower()}")
            return None

    def relative(self, value: Any) -> Any:
        """A relative path made absolute against the flows file's folder; anything else unchanged."""
        if not isinstance(value, str) or not value or value.lstrip().startswith("{"):  # "{...}": JSON, not a path
            return value
        resolved = Path(value).expanduser()
        return str(resolved if resolved.is_absolute() else self.folder / resolved)

    # -- the document --------------------------------------------------------------------------------------------

    def read(self, document: dict[str, Any]) -> RuntimeConfig | None:
        root = _Table(document, (), "top level")
        self.unknown_keys(root, ("runtime", "flow"))
        runtime = self.runtime(
            self.subtable(root, "runtime", "runtime", example='[runtime] state = "sqlite"', required=False)
            or _Table({}, ("runtime",), "[runtime]")
        )
        items = document.get("flow", [])
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            self.problem(root, "flow", "'flow' must be an array of tables", "write each flow as a [[flow]] table")
        elif not items:
            hint = (
                "add a [[flow]] with name, protocol, [flow.sender] and [flow.target]; "
                "'postbridge flows example' prints a complete file"
            )
            self.problems.append(Problem(None, "the file defines no flow: there is no [[flow]] table", hint))
        else:
            seen: dict[str, int | None] = {}
            flows = [
                self.flow(_Table(data, ("flow", index), f"flow #{index + 1}"), seen) for index, data in enumerate(items)
            ]
            if runtime is not None and not self.problems:
                return RuntimeConfig(self.path, *runtime, flows=tuple(flow for flow in flows if flow is not None))
        return None

    def runtime(self, table: _Table) -> tuple[str, HostPort | None, float, str] | None:
        self.unknown_keys(table, RUNTIME_KEYS)
        state = self.string(table, "state", "sqlite", example='state = "sqlite"')
        if state is not None and not _state_scheme_ok(state):
            hint = 'use "sqlite" (HOME/runtime.db), "sqlite:///abs/path.db" or "postgresql://user@host:5432/db"'
            self.problem(table, "state", f"state '{_mask(state)}' is not a state store this runtime knows", hint)
            state = None
        metrics_text = self.string(table, "metrics", "127.0.0.1:9464", example='metrics = "127.0.0.1:9464"')
        metrics: HostPort | None = None
        if metrics_text:
            try:
                metrics = parse_host_port(metrics_text, what="metrics")
            except ConfigurationError as exc:
                self.problem(table, "metrics", exc.message, 'e.g. metrics = "127.0.0.1:9464"; "" turns it off')
                metrics_text = None
        lease = self.seconds(table, "lease_seconds", 60.0)
        worker = self.string(table, "worker", "", example='worker = "worker-1" ("" = hostname-pid)')
        if state is None or metrics_text is None or lease is None or worker is None:
            return None
        return state, metrics, lease, worker

    def flow(self, table: _Table, seen: dict[str, int | None]) -> FlowConfig | None:
        before = len(self.problems)
        name = table.data.get("name")
        if isinstance(name, str) and _NAME.fullmatch(name):
            table.label = f"flow '{name}'"
            if name in seen:
                self.problem(
                    table, "name", f"the name is taken (first at line {seen[name]})", "give every flow its own name"
                )
            seen.setdefault(name, self.lines.line(*table.path, "name"))
        else:
            shown = repr(name) if isinstance(name, str) else _type(name) if "name" in table.data else "missing"
            hint = 'a-z, 0-9, "_", ".", "-", starting with a letter or digit, at most 63 characters: name = "invoices"'
            self.problem(table, "name", f"name is {shown}; every flow needs a unique name", hint)
        self.unknown_keys(table, FLOW_KEYS)
        protocol = self.choice(table, "protocol", PROTOCOLS, "imap")
        mode = self.choice(table, "mode", MODES, "poll")
        if protocol == "pop3" and mode == "idle":
            hint = 'use mode = "poll" (and set interval), or protocol = "imap"'
            self.problem(table, "mode", "mode 'idle' needs IMAP; POP3 can only be polled", hint)
        interval = self.seconds(table, "interval", 60.0)
        stale_after = self.seconds(table, "stale_after", max(60.0, 10 * (interval or 60.0)))
        if interval is not None and stale_after is not None and stale_after < interval:
            self.problem(
                table, "stale_after",
                f"stale_after {stale_after:g} is shorter than interval {interval:g}: the flow would look unhealthy "
                "between two good polls", f"use at least the interval, e.g. stale_after = {max(60.0, 10 * interval):g}",
            )  # fmt: skip
        enabled = self.boolean(table, "enabled", True)
        retry = self.retry(table)
        sender = self.sender(table, protocol, retry)
        target = self.target(table)
        if (
            len(self.problems) > before or not isinstance(name, str) or protocol is None or mode is None
            or interval is None or stale_after is None or enabled is None or retry is None or sender is None
            or target is None
        ):  # fmt: skip
            return None
        source = f"{self.path} [flow.target] of {table.label}"
        if self.check_target is not None:
            try:
                self.check_target(target, source)
            except PostbridgeError as exc:
                target_table = _Table({}, (*table.path, "target"), f"[flow.target] of {table.label}")
                self.problem(target_table, None, exc.message.removeprefix(f"{source}: "), exc.hint)
                return None
        return FlowConfig(
            name, protocol, mode, interval, stale_after, enabled, *sender, retry, target, source,
            self.lines.line(*table.path) or 0,
        )  # fmt: skip

    def retry(self, flow: _Table) -> RetryPolicy | None:
        table = self.subtable(flow, "retry", "flow.retry", example="[flow.retry] max_attempts = 5", required=False)
        if table is None:
            return None if "retry" in flow.data else RetryPolicy()
        self.unknown_keys(table, RETRY_KEYS)
        defaults = RetryPolicy()
        max_attempts = self.count(table, "max_attempts", defaults.max_attempts)
        initial = self.seconds(table, "initial", defaults.initial)
        maximum = self.seconds(table, "maximum", defaults.maximum)
        multiplier = self.seconds(table, "multiplier", defaults.multiplier)
        if max_attempts is None or initial is None or maximum is None or multiplier is None:
            return None
        try:
            return RetryPolicy(max_attempts, initial, maximum, multiplier)
        except ConfigurationError as exc:
            self.error(table, exc)
            return None

    def sender(
        self, flow: _Table, protocol: str | None, retry: RetryPolicy | None
    ) -> tuple[ChannelSettings, SenderSettings, Pop3PostProcessing] | None:
        example = '[flow.sender] address = "mail.corp.example:143"'
        table = self.subtable(flow, "sender", "flow.sender", example=example)
        if table is None:
            return None
        before = len(self.problems)
        self.unknown_keys(table, CHANNEL_KEYS + SENDER_KEYS)
        channel = self.channel(table)
        values: dict[str, Any] = {"post_processing": PostProcessing.KEEP} if protocol == "pop3" else {}
        pop3_post_processing = Pop3PostProcessing.DELETE
        for spec in dataclasses.fields(SenderSettings):
            key, default = spec.name, spec.default
            if key not in table.data or key not in SENDER_KEYS:
                continue
            if protocol == "pop3" and key in _POP3_WITHOUT:
                hint = 'remove it, or use protocol = "imap"'
                self.problem(table, key, f"{key} has no meaning for POP3 (one mailbox, no folders)", hint)
            elif isinstance(default, enum.StrEnum):
                kind = Pop3PostProcessing if key == "post_processing" and protocol == "pop3" else type(default)
                allowed = tuple(member.value for member in kind)
                text = self.string(table, key, "", example=f'{key} = "{allowed[0]}"')
                try:
                    parsed = parse_enum(kind, text, key) if text is not None else None
                except ConfigurationError as exc:
                    self.problem(table, key, exc.message, _choice_hint(key, str(text), allowed))
                    continue
                if isinstance(parsed, Pop3PostProcessing):
                    pop3_post_processing = parsed
                else:
                    values[key] = parsed
            elif isinstance(default, int):
                values[key] = self.count(table, key, default)
            else:
                values[key] = self.string(table, key, "", example=f'{key} = "{default}"')
                if values[key] == "":
                    self.problem(
                        table, key, f"{key} is empty", f'e.g. {key} = "{default}", or remove it for that default'
                    )
        if len(self.problems) > before or channel is None or retry is None:
            return None
        try:
            return channel, SenderSettings(**values, max_attempts=retry.max_attempts), pop3_post_processing
        except ConfigurationError as exc:
            self.error(table, exc)
            return None

    def channel(self, table: _Table) -> ChannelSettings | None:
        """The channel keys, parsed by the mail adapter once their TOML types are right (it expects strings)."""
        defaults = {spec.name: spec.default for spec in dataclasses.fields(ChannelSettings)}
        data: dict[str, Any] = {}
        for key in CHANNEL_KEYS:
            if key not in table.data:
                continue
            value, default = table.data[key], defaults.get(key, "")
            if isinstance(value, str) or _same_kind(value, default):
                data[key] = self.relative(value) if key in ("binding", "keystore") else value
                continue
            example = f"{key} = {str(default).lower()}" if isinstance(default, bool | float) else f'{key} = "..."'
            expected = (
                "true or false"
                if isinstance(default, bool)
                else "a number"
                if isinstance(default, float)
                else "a string"
            )
            shown = "something else" if key == "password" else _type(value)  # never quote a password
            self.problem(table, key, f"{key} must be {expected}, not {shown}", f"e.g. {example}")
        if len(data) < len([key for key in CHANNEL_KEYS if key in table.data]):
            return None
        if data.get("user") and "password" not in data and not data.get("credential"):
            hint = "use credential = \"NAME\" (a name in 'postbridge credentials') instead of user and password"
            self.problem(table, "user", f"user '{data['user']}' is given without a password", hint)
            return None

        def lookup(name: str) -> Credentials:
            assert self.credentials is not None  # channel_from_mapping calls only a resolver it was given
            try:
                return self.credentials.resolve(name)
            except PostbridgeError as exc:
                raise _CredentialFailed(exc) from exc

        try:
            return channel_from_mapping(data, source=table.label, credentials=lookup if self.credentials else None)
        except _CredentialFailed as exc:
            message = f"credential '{data.get('credential')}' cannot be used: {exc.message}"
            self.problem(table, "credential", message, exc.hint or "add it with 'postbridge credentials add'")
        except ConfigurationError as exc:
            self.error(table, exc)
        return None

    def target(self, flow: _Table) -> Mapping[str, Any] | None:
        table = self.subtable(flow, "target", "flow.target", example='[flow.target] kind = "directory"')
        if table is None:
            return None
        kind = table.data.get("kind")
        if kind is None:
            self.problem(
                table, None, "'kind' is missing", f'add e.g. kind = "directory"; kinds: {", ".join(TARGET_KINDS)}'
            )
            return None
        if kind not in TARGET_KINDS:
            hint = _choice_hint("kind", str(kind), TARGET_KINDS)
            self.problem(table, "kind", f"kind {kind!r} is not one of: {', '.join(TARGET_KINDS)}", hint)
            return None
        return MappingProxyType({key: self.relative(v) if key in _TARGET_PATHS else v for key, v in table.data.items()})


def _same_kind(value: Any, default: Any) -> bool:
    """A TOML value of the type a ChannelSettings field has by default (a bool is not a number here)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    return isinstance(default, float) and isinstance(value, int | float)


def _state_scheme_ok(state: str) -> bool:
    if state in ("", "sqlite"):
        return True
    if state.startswith("sqlite:///"):
        return len(state) > len("sqlite:///")
    return state.startswith("postgresql://")


def _mask(url: str) -> str:
    """The URL with its password (if any) replaced by '***', for quoting in a message."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rpartition("@")[2]
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:
        return "(a URL that cannot be parsed)"


def _type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", dict: "a table", list: "an array"}
    return names.get(type(value), type(value).__name__)
