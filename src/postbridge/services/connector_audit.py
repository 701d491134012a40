"""Reading a connector's audit log for the web UI and its JSON API: filters (allowed, denied, configuration changes;
one virtual host; a time range), pages, and CSV.

Owns the query values and their validation (a bad kind or time is InvalidInput naming it), matching records, paging
newest first, and the CSV (cells that a spreadsheet would read as formulas are neutralised). Must not write the log
(:mod:`postbridge.connector.audit` does) or know about HTTP.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from postbridge.connector.state import ConnectorState
from postbridge.services import InvalidInput, virtual_address

AUDIT_SCAN_LIMIT = 50_000  # newest records searched by the audit viewer and its CSV export
AUDIT_PAGE_MAX = 500
AUDIT_KINDS = ("all", "allowed", "denied", "config")


@dataclass(frozen=True)
class AuditQuery:
    """Which audit records to show: ``kind`` (all, allowed, denied, config), one virtual host, a time range."""

    kind: str = "all"
    virtual: str = ""
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, record: dict[str, Any]) -> bool:
        event = record.get("event")
        wanted = {"allowed": "access-allowed", "denied": "access-denied", "config": "config-change"}.get(self.kind)
        if wanted is not None and event != wanted:
            return False
        if self.virtual and _recordvirtual_address(record) != self.virtual:
            return False
        if self.since is not None or self.until is not None:
            moment = _record_time(record)
            if moment is None:
                return False
            if self.since is not None and moment < self.since:
                return False
            if self.until is not None and moment >= self.until:
                return False
        return True

    def to_params(self) -> dict[str, str]:
        """The query as URL parameters (for links to other pages and the CSV export)."""
        params = {"kind": self.kind, "mapping": self.virtual}
        if self.since is not None:
            params["since"] = self.since.strftime("%Y-%m-%dT%H:%M")
        if self.until is not None:
            params["until"] = self.until.strftime("%Y-%m-%dT%H:%M")
        return {key: value for key, value in params.items() if value and value != "all"}


@dataclass(frozen=True)
class AuditPage:
    """One page of matching records, newest first; ``total`` counts all matches among the records searched."""

    records: list[dict[str, Any]]
    total: int
    offset: int
    limit: int
    searched: int
    truncated: bool  # the log holds more than AUDIT_SCAN_LIMIT records: older ones were not searched

    def to_json(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "total": self.total,
            "offset": self.offset,
            "limit": self.limit,
            "searched": self.searched,
            "truncated": self.truncated,
        }


def audit_query(kind: str = "all", mapping: str = "", since: str = "", until: str = "") -> AuditQuery:
    """Parse the audit filters; times are ISO 8601 (``2024-05-01``, ``2024-05-01T12:30``, with or without a zone;
    without one they are UTC). Raises InvalidInput quoting the bad value."""
    kind = (kind or "all").strip().lower()
    if kind not in AUDIT_KINDS:
        raise InvalidInput(f"unknown audit filter '{kind}'", hint=f"use one of {', '.join(AUDIT_KINDS)}")
    virtual = str(virtual_address(mapping)) if mapping.strip() else ""
    start, end = _parse_time(since, "since"), _parse_time(until, "until")
    if start is not None and end is not None and end <= start:
        raise InvalidInput(
            f"the time range ends ({end:%Y-%m-%d %H:%M}) before it starts ({start:%Y-%m-%d %H:%M})",
            hint="swap the two times",
        )
    return AuditQuery(kind, virtual, start, end)


def audit_records(state: ConnectorState, query: AuditQuery, *, offset: int = 0, limit: int = 50) -> AuditPage:
    """The matching records from ``offset`` on, newest first, at most ``limit`` (1 to 500).

    Raises InvalidInput for a negative offset or a limit out of range.
    """
    if offset < 0:
        raise InvalidInput(f"offset {offset} is negative", hint="start at 0")
    if not 0 < limit <= AUDIT_PAGE_MAX:
        raise InvalidInput(f"limit {limit} is out of range", hint=f"ask for 1 to {AUDIT_PAGE_MAX} records")
    matching, searched = _matching(state, query)
    return AuditPage(
        records=matching[offset : offset + limit],
        total=len(matching),
        offset=offset,
        limit=limit,
        searched=searched,
        truncated=searched >= AUDIT_SCAN_LIMIT,
    )


AUDIT_CSV_COLUMNS = (
    "time",
    "event",
    "subaccount",
    "location",
    "virtual",
    "internal",
    "trace_id",
    "reason",
    "action",
    "actor",
    "detail",
)


def audit_csv(state: ConnectorState, query: AuditQuery) -> str:
    """Every matching record as CSV (header row first, newest first). Cells that a spreadsheet would run as a
    formula (starting with ``=``, ``+``, ``-``, ``@``) are prefixed with ``'``."""
    matching, _ = _matching(state, query)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(AUDIT_CSV_COLUMNS)
    for record in matching:
        row = []
        for column in AUDIT_CSV_COLUMNS:
            value = record.get(column)
            if column == "detail" and value is not None:
                value = json.dumps(value, sort_keys=True, ensure_ascii=False)
            row.append(_csv_cell(value))
        writer.writerow(row)
    return out.getvalue()


def _matching(state: ConnectorState, query: AuditQuery) -> tuple[list[dict[str, Any]], int]:
    records = state.audit.read(limit=AUDIT_SCAN_LIMIT)
    return [record for record in reversed(records) if query.matches(record)], len(records)


def _recordvirtual_address(record: dict[str, Any]) -> str:
    value = record.get("virtual")
    if not value and isinstance(record.get("detail"), dict):
        value = record["detail"].get("virtual")
    return str(value or "").lower()


def _record_time(record: dict[str, Any]) -> datetime | None:
    try:
        moment = datetime.fromisoformat(str(record.get("time", "")))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _parse_time(text: str, what: str) -> datetime | None:
    value = (text or "").strip()
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(
            f"'{what}' time '{value}' is not an ISO 8601 time", hint="write it like 2024-05-01 or 2024-05-01T12:30"
        ) from None
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def _csv_cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
