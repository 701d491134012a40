"""What the hub says about a SOCKS5 refusal, for the connection test: evidence lines and the fix.

:func:`diagnose_refusal` asks the hub (through :class:`postbridge.mail.hub_api.HubApi`) per reply code: 0x02 lists the
location's mappings (and a near miss), 0x03 the connected locations (and a near miss), 0x01/0x04 run the connector's
availability check. :func:`mapping_of` tells whether a virtual address is mapped as ``tcp`` or ``tcp-tls``.

Must not: raise (a diagnosis is an extra: a fault must not hide the refusal it explains), print, or put the client
secret or a token into evidence or a fix.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from postbridge.addresses import HostPort, parse_host_port
from postbridge.errors import ConfigurationError, PostbridgeError
from postbridge.mail.hub_api import BINDING_HINT, HubApi, describe_location, mask_secret
from postbridge.mail.settings import ChannelSettings, Protection

T = TypeVar("T")
_EMPTY = "''"  # the default location ID, as typed in a shell
_IMPLICIT_TLS = {993: "IMAPS", 995: "POP3S", 465: "SMTPS"}


@dataclass(frozen=True)
class HubDiagnosis:
    """What the hub says about a refusal: lines of evidence to show, and the fix (empty when none is known)."""

    evidence: tuple[str, ...]
    fix: str = ""


def diagnose_refusal(settings: ChannelSettings, reply: int, *, api: HubApi | None = None) -> HubDiagnosis:
    """Ask the hub why it refused ``settings.address`` with SOCKS5 ``reply`` (0x01-0x04; other codes: no diagnosis).

    0x02 lists the location's mappings, 0x03 the connected locations, 0x01/0x04 run the connector's availability
    check. Never raises: when the hub cannot be asked, the one evidence line is ``could not ask the hub: <cause>``.
    """
    ask = {0x01: _diagnose_check, 0x02: _diagnose_unmapped, 0x03: _diagnose_location, 0x04: _diagnose_check}.get(reply)
    if ask is None:
        return HubDiagnosis(())
    try:
        diagnosis = _with_api(settings, api, ask)
    except PostbridgeError as exc:
        diagnosis = HubDiagnosis((f"could not ask the hub: {exc}",))
    except Exception as exc:  # a diagnosis is an extra: a fault here must not hide the refusal it explains
        diagnosis = HubDiagnosis((f"could not ask the hub: unexpected {type(exc).__name__}",))
    secret = settings.binding.client_secret if settings.binding else ""
    return HubDiagnosis(
        tuple(mask_secret(line, secret) for line in diagnosis.evidence), mask_secret(diagnosis.fix, secret)
    )


def mapping_of(settings: ChannelSettings, *, api: HubApi | None = None) -> dict[str, Any] | None:
    """The mapping the hub reports for exactly ``settings.address`` at ``settings.location_id``, or None (also
    when the hub cannot be asked). Never raises."""
    try:
        mappings = _with_api(settings, api, lambda _settings, hub: hub.mappings(settings.location_id))
        wanted = _normal(settings.address)
        return next((m for m in mappings if _virtual(m) == wanted), None)
    except Exception:  # the caller only wants to learn tcp or tcp-tls; no answer is "not known"
        return None


def _with_api(settings: ChannelSettings, api: HubApi | None, ask: Callable[[ChannelSettings, HubApi], T]) -> T:
    if api is not None:
        return ask(settings, api)
    if settings.binding is None:
        raise ConfigurationError(f"channel {settings.address} has no binding of the hub", hint=BINDING_HINT)
    with HubApi(settings.binding, timeout=min(settings.timeout, 5.0)) as own:
        return ask(settings, own)


def _diagnose_unmapped(settings: ChannelSettings, api: HubApi) -> HubDiagnosis:
    wanted, where = _normal(settings.address), describe_location(settings.location_id)
    mappings = api.mappings(settings.location_id)
    evidence = [f"mappings the hub knows for {where}:"] if mappings else [f"the hub knows no mapping for {where}"]
    evidence += [f"  {_mapping_line(m)}" for m in mappings]
    known = [address for address in map(_virtual, mappings) if address is not None]
    if wanted in known:
        evidence.append(f"{wanted} is mapped now (added after the refusal?)")
        return HubDiagnosis(tuple(evidence), "try again")
    ports = [str(other.port) for other in known if other.host == wanted.host]
    if ports:  # the host is right: suggest the port that looks most like the wanted one, else name them all
        close = difflib.get_close_matches(str(wanted.port), ports, n=1, cutoff=0.5)
        if close:
            evidence.append(
                f"did you mean {HostPort(wanted.host, int(close[0]))}? the hub knows '{wanted.host}' at port "
                f"{close[0]}, not {wanted.port}"
            )
        else:
            evidence.append(f"the hub knows '{wanted.host}' at port(s) {', '.join(ports)}, not {wanted.port}")
    same_port = [other.host for other in known if other.port == wanted.port]
    for host in difflib.get_close_matches(wanted.host, same_port, n=1, cutoff=0.6):
        evidence.append(f"did you mean {HostPort(host, wanted.port)}? the hub knows that host at port {wanted.port}")
    command = f"postbridge connector mapping add {wanted} --to HOST:PORT"
    fix = f"on the connector of {where}: {command} (HOST:PORT = the internal mail server)"
    name = _IMPLICIT_TLS.get(wanted.port)
    if name and settings.protection is Protection.OFF:
        fix = f"on the connector of {where}: {command} --protocol tcp-tls (HOST:PORT = the internal {name} port; "
        fix += "the connector does the TLS: add the server's CA with 'postbridge connector truststore add FILE')"
    elif name:
        fix += f"; port {wanted.port} is {name}: to let the connector do the TLS instead, add --protocol tcp-tls "
        fix += "and use protection 'off'"
    return HubDiagnosis(tuple(evidence), fix)


def _diagnose_location(settings: ChannelSettings, api: HubApi) -> HubDiagnosis:
    subaccount, wanted = settings.binding.subaccount if settings.binding else "?", settings.location_id
    by_location: dict[str, list[str]] = {}
    for connector in api.connectors():
        by_location.setdefault(str(connector.get("location", "")), []).append(str(connector.get("connector_id")))
    if not by_location:
        return HubDiagnosis(
            (f"no connector is connected for subaccount '{subaccount}'",),
            "start the connector: postbridge connector run",
        )
    evidence = [f"connectors connected for subaccount '{subaccount}':"]
    evidence += [f"  {describe_location(location)}: {', '.join(ids)}" for location, ids in sorted(by_location.items())]
    if wanted in by_location:
        evidence.append(
            f"a connector is connected at {describe_location(wanted)} now (it connected after the refusal?)"
        )
        return HubDiagnosis(tuple(evidence), "try again")
    close = difflib.get_close_matches(wanted, [location for location in by_location if location], n=1, cutoff=0.6)
    if close:
        evidence.append(f"did you mean '{close[0]}'?")
        return HubDiagnosis(
            tuple(evidence), f"set the channel's location ID (location_id, --location-id) to '{close[0]}'"
        )
    connected = ", ".join(f"'{location}'" for location in sorted(by_location))
    fix = f"set the channel's location ID to one of {connected}, or start a connector enrolled for "
    fix += f"{describe_location(wanted)}: "
    fix += (
        f"postbridge cloud enroll {subaccount} --location {wanted or _EMPTY}, then postbridge connector enroll and run"
    )
    return HubDiagnosis(tuple(evidence), fix)


def _diagnose_check(settings: ChannelSettings, api: HubApi) -> HubDiagnosis:
    wanted, where = _normal(settings.address), describe_location(settings.location_id)
    answer = api.check(settings.location_id, wanted)
    if answer.get("mapped") is False:
        fix = f"on the connector of {where}: postbridge connector mapping add {wanted} --to HOST:PORT"
        return HubDiagnosis(
            (f"the connector at {where} has no mapping for {wanted} (removed after the refusal?)",), fix
        )
    internal, protocol = str(answer.get("internal", "?")), str(answer.get("protocol", "tcp"))
    summary = str(answer.get("summary") or answer.get("error") or "no answer")
    evidence = [f"the connector's check of {wanted} -> {internal} ({protocol}): {summary}"]
    if answer.get("reachable") is True:
        evidence.append("the internal server answers now: the refusal may have been passing")
        return HubDiagnosis(
            tuple(evidence), "try again; if it recurs, read the connector's log at the time of the refusal"
        )
    error, reason, hint = str(answer.get("error") or ""), answer.get("reason"), str(answer.get("hint") or "")
    again = f"postbridge connector mapping remove {wanted}, then postbridge connector mapping add {wanted} --to"
    if reason == "backend-tls" and "mismatch" in error:
        fix = f"{again} {internal} --protocol tcp-tls --tls-server-name NAME (a name the server's certificate carries)"
    elif reason == "backend-tls" and "trust store" in error:  # the dialer's words for an unknown issuer
        fix = "add the internal server's CA to the connector's trust store: postbridge connector truststore add FILE"
    elif reason == "host-unreachable":
        tls = " --protocol tcp-tls" if protocol == "tcp-tls" else ""
        fix = f"start the mail server at {internal}, or fix the internal address: {again} HOST:PORT{tls}"
    else:
        fix = hint
    return HubDiagnosis(tuple(evidence), fix)


def _mapping_line(mapping: dict[str, Any]) -> str:
    off = "" if mapping.get("enabled", True) else ", disabled"
    return f"{mapping.get('virtual')} -> {mapping.get('internal')} ({mapping.get('protocol', 'tcp')}{off})"


def _virtual(mapping: dict[str, Any]) -> HostPort | None:
    try:
        return _normal(parse_host_port(str(mapping.get("virtual", "")), what="mapping"))
    except ConfigurationError:
        return None


def _normal(address: HostPort) -> HostPort:
    """``address`` as mappings are keyed: host names in lower case, IP addresses in canonical form."""
    try:
        return HostPort(str(ipaddress.ip_address(address.host)), address.port)
    except ValueError:
        return HostPort(address.host.lower(), address.port)
