"""The connection test of a mail channel (``postbridge test …``), step by step, as a library.

:func:`run_probe` walks the way a real session goes — connection (direct TCP or SOCKS5 through the hub), TLS or
STARTTLS, greeting, capabilities before and after TLS (EHLO features for SMTP), offered authentication mechanisms,
optionally the login, IMAP folders with counts and the POP3 message count — and records each step with its timing
and what it saw. The first failing step carries the cause and the fix, taken from the :class:`PostbridgeError` the
mail clients raise (their messages and hints are the diagnoses), and the run stops there.

After a TLS handshake the certificate chain is shown certificate by certificate. When a step fails, named checks
explain it (:mod:`probe_checks`, :mod:`hub_diagnosis`): the hub is asked about a SOCKS5 refusal, a second
connection tells an implicit-TLS port from a plain one, and a refused chain is fetched again without verification.

Rooms: this module owns the report and the failure analysis; :mod:`probe_run` the step runner and shared steps;
:mod:`probe_protocols` the walk per protocol, reusing the clients' own connection steps (:mod:`imap`, :mod:`pop3`,
:mod:`smtp`, :mod:`transport`), so the test behaves exactly like a channel does. None of them prints or logs (the
CLI renders the report) or puts a password or token into a step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

from postbridge.errors import ConfigurationError, NetworkError, PostbridgeError, TrustError
from postbridge.mail import probe_checks as checks
from postbridge.mail import transport
from postbridge.mail.common import TlsDowngrade
from postbridge.mail.hub_diagnosis import diagnose_refusal
from postbridge.mail.probe_protocols import PROBES
from postbridge.mail.probe_run import TLS_STEPS, FolderCount, ProbeOptions, Run, Step, Stop
from postbridge.mail.settings import ChannelSettings, Proxy
from postbridge.mail.smtp import EnvelopeReply
from postbridge.trust.server_chain import ChainReport

__all__ = ["KINDS", "FolderCount", "ProbeKind", "ProbeOptions", "ProbeReport", "Step", "run_probe"]

ProbeKind = Literal["imap", "pop3", "smtp", "tcp", "tls"]
KINDS: tuple[str, ...] = ("imap", "pop3", "smtp", "tcp", "tls")


@dataclass(frozen=True)
class ProbeReport:
    """The whole test: the channel it ran against and its steps, in order (the last one failed if any did)."""

    kind: str
    target: str
    steps: tuple[Step, ...]
    folders: tuple[FolderCount, ...] = ()
    message_count: int | None = None
    chain: ChainReport | None = None
    envelope: tuple[EnvelopeReply, ...] = ()

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(step.ok for step in self.steps)

    @property
    def failed(self) -> Step | None:
        return next((step for step in self.steps if not step.ok), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "ok": self.ok,
            "steps": [
                {
                    "name": step.name,
                    "ok": step.ok,
                    "elapsed_ms": round(step.elapsed_ms, 1),
                    "detail": step.detail,
                    "cause": step.cause,
                    "fix": step.fix,
                    "evidence": list(step.evidence),
                    "warning": step.warning,
                }
                for step in self.steps
            ],
            "folders": [{"name": f.name, "total": f.total, "unread": f.unread} for f in self.folders],
            "message_count": self.message_count,
            "chain": self.chain.to_json() if self.chain else None,
            "envelope": [
                {"address": r.address, "role": r.role, "code": r.code, "text": r.text, "accepted": r.accepted}
                for r in self.envelope
            ],
        }


def run_probe(
    kind: ProbeKind | str,
    settings: ChannelSettings,
    *,
    check_auth: bool = False,
    list_folders: bool = False,
    sender: str = "",
    recipients: tuple[str, ...] = (),
) -> ProbeReport:
    """Test the channel step by step; never raises for what the test finds (that is in the report).

    ``check_auth`` logs in with the channel's credentials; ``list_folders`` (IMAP) logs in and counts the messages
    of every folder; ``sender`` and ``recipients`` (SMTP) check the envelope without sending a mail. When a step
    fails, named checks explain it: the hub is asked about a SOCKS5 refusal, a second connection tells a TLS port
    from a plain one, and an untrusted certificate chain is fetched again (without verification) to show it.
    Raises ConfigurationError only for an unknown ``kind`` or a malformed sender/recipient.
    """
    if kind not in KINDS:
        raise ConfigurationError(f"test kind '{kind}' is not one of: {', '.join(KINDS)}")
    if (sender or recipients) and kind != "smtp":
        raise ConfigurationError("--from and --to belong to 'postbridge test smtp'")
    if bool(sender) != bool(recipients):
        raise ConfigurationError("the envelope check needs both a sender (--from) and a recipient (--to)")
    options = ProbeOptions(check_auth, list_folders, sender, tuple(recipients))
    run = Run(settings, options)
    with contextlib.suppress(Stop):
        PROBES[kind](run)
    if run.steps and not run.steps[-1].ok:
        _explain_failure(str(kind), run)
    return ProbeReport(
        kind=str(kind),
        target=settings.describe,
        steps=tuple(run.steps),
        folders=tuple(run.folders),
        message_count=run.message_count,
        chain=run.chain,
        envelope=tuple(run.envelope),
    )


def _explain_failure(kind: str, run: Run) -> None:
    """The named checks behind the failed last step: they add evidence and a better fix, and never raise."""
    settings, failed, error = run.settings, run.steps[-1], run.error
    if isinstance(error, transport.MailConnectError) and error.socks_reply is not None:
        diagnosis = diagnose_refusal(settings, error.socks_reply)
        run.amend(evidence=diagnosis.evidence, fix=diagnosis.fix)
    elif failed.name in TLS_STEPS and isinstance(error, TrustError):
        _show_untrusted_chain(kind, run)
    elif failed.name in TLS_STEPS and isinstance(error, TlsDowngrade) and settings.proxy is Proxy.ON_PREMISE:
        run.amend(**checks.starttls_over_tcp_tls(settings))
    elif failed.name in TLS_STEPS and isinstance(error, transport.NotTlsError):
        run.amend(**checks.tls_to_plain_port(settings))
    elif failed.name in ("greeting", "first line") and isinstance(error, NetworkError) and not _began_tls(run):
        run.amend(**checks.plain_to_tls_port(settings))


def _began_tls(run: Run) -> bool:
    return any(step.name in TLS_STEPS for step in run.steps)


def _show_untrusted_chain(kind: str, run: Run) -> None:
    """Fetch the chain the verified handshake refused, on a second connection without verification."""
    again = Run(run.settings, ProbeOptions(), inspect=True)
    with contextlib.suppress(Stop):
        PROBES[kind](again)
    if not again.sent_chain:
        run.amend(evidence=("could not fetch the certificate chain on a second connection",))
        return
    try:
        report = checks.explain(run.settings, again.sent_chain)
    except PostbridgeError as exc:
        run.amend(evidence=(f"could not explain the certificate chain: {exc.message}",))
        return
    run.chain = report
    evidence = (
        f"the chain, fetched again without verification to show it: {len(again.sent_chain)} certificate(s) sent",
    )
    if report.problem:
        run.amend(evidence=(*evidence, report.cause), fix=report.fix)
    else:
        run.amend(evidence=(*evidence, "postbridge's own check finds this chain sound: OpenSSL's reason above decides"))
