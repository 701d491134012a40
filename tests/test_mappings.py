"""Mappings: the value, its JSON form, the protocol parser and the atomically written mappings file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from postbridge.addresses import HostPort, parse_host_port
from postbridge.connector.mappings import Mapping, MappingStore, Protocol, parse_protocol
from postbridge.errors import ConfigurationError


def make(virtual: str = "mail.corp:143", internal: str = "10.1.2.3:143") -> Mapping:
    return Mapping(parse_host_port(virtual), parse_host_port(internal), Protocol.TCP)


@pytest.fixture
def store(tmp_path: Path) -> MappingStore:
    return MappingStore(tmp_path / "connector" / "mappings.json")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp", Protocol.TCP),
        ("TCP", Protocol.TCP),
        ("tcp-tls", Protocol.TCP_TLS),
        ("TCP TLS", Protocol.TCP_TLS),
        ("tcp_tls", Protocol.TCP_TLS),
        (" Tcp-Tls ", Protocol.TCP_TLS),
    ],
)
def test_parse_protocol_accepts_the_spellings(text: str, expected: Protocol) -> None:
    assert parse_protocol(text) is expected


@pytest.mark.parametrize("text", ["udp", "tls", "", "tcp tls tls", "https"])
def test_parse_protocol_rejects_others_quoting_them(text: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_protocol(text)
    assert f"'{text}'" in str(info.value)
    assert "tcp-tls" in info.value.hint


def test_json_round_trip_keeps_every_field() -> None:
    mapping = Mapping(
        virtual=HostPort("mail.corp", 993),
        internal=HostPort("10.1.2.3", 993),
        protocol=Protocol.TCP_TLS,
        tls_server_name="imap.corp.example",
        description="IMAPS of the sales mailbox",
        enabled=False,
    )
    data = mapping.to_json()
    assert data == {
        "virtual": "mail.corp:993",
        "internal": "10.1.2.3:993",
        "protocol": "tcp-tls",
        "tls_server_name": "imap.corp.example",
        "description": "IMAPS of the sales mailbox",
        "enabled": False,
    }
    assert Mapping.from_json(json.loads(json.dumps(data)), source="test") == mapping


def test_ipv6_addresses_round_trip() -> None:
    mapping = Mapping(HostPort("::1", 1143), HostPort("fd00::5", 143), Protocol.TCP)
    assert mapping.to_json()["virtual"] == "[::1]:1143"
    assert Mapping.from_json(mapping.to_json(), source="test") == mapping


def test_server_name_defaults_to_the_internal_host() -> None:
    plain = Mapping(HostPort("mail.corp", 993), HostPort("imap.internal", 993), Protocol.TCP_TLS)
    named = Mapping(HostPort("mail.corp", 993), HostPort("10.0.0.7", 993), Protocol.TCP_TLS, "Imap.Corp")
    assert plain.server_name == "imap.internal"
    assert named.server_name == "imap.corp"


def test_tls_to_an_ip_without_server_name_is_allowed() -> None:
    mapping = Mapping(HostPort("mail.corp", 993), HostPort("10.0.0.7", 993), Protocol.TCP_TLS)
    assert mapping.server_name == "10.0.0.7"


def test_tls_server_name_with_plain_tcp_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="only used with protocol 'tcp-tls'"):
        Mapping(HostPort("mail.corp", 143), HostPort("10.0.0.7", 143), Protocol.TCP, "imap.corp")


def test_bad_tls_server_name_is_quoted() -> None:
    with pytest.raises(ConfigurationError, match="'not a name'"):
        Mapping(HostPort("mail.corp", 993), HostPort("10.0.0.7", 993), Protocol.TCP_TLS, "not a name")


def test_virtual_host_is_case_insensitive() -> None:
    upper = Mapping(HostPort("MAIL.Corp", 143), HostPort("10.0.0.7", 143), Protocol.TCP)
    assert upper.virtual == parse_host_port("mail.corp:143")
    long_ipv6 = Mapping(HostPort("0:0::1", 143), HostPort("10.0.0.7", 143), Protocol.TCP)
    assert long_ipv6.virtual == HostPort("::1", 143)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"internal": "10.0.0.1:143", "protocol": "tcp"}, "missing field(s) virtual"),
        ({"virtual": "a:1", "internal": "10.0.0.1:143", "protocol": "smtp"}, "unknown protocol 'smtp'"),
        ({"virtual": "a:99999", "internal": "10.0.0.1:143", "protocol": "tcp"}, "port 99999"),
        ({"virtual": "a:1", "internal": "b c:143", "protocol": "tcp"}, "invalid host 'b c'"),
        ({"virtual": "a:1", "internal": "b:1", "protocol": "tcp", "enabled": "yes"}, "'enabled'"),
        ({"virtual": "a:1", "internal": "b:1", "protocol": "tcp", "colour": "red"}, "'colour'"),
        ({"virtual": 143, "internal": "b:1", "protocol": "tcp"}, "'virtual' has the wrong type: 143"),
        (["a:1"], "expected a JSON object, found ['a:1']"),
    ],
)
def test_from_json_names_source_and_bad_value(data: object, expected: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Mapping.from_json(data, source="'m.json' entry 3")
    assert str(info.value).startswith("'m.json' entry 3: ")
    assert expected in str(info.value)


def test_missing_file_loads_empty(store: MappingStore) -> None:
    assert store.load() == {}
    assert store.version() == (0, 0)


def test_add_load_remove(store: MappingStore) -> None:
    imap = make("mail.corp:143", "10.1.2.3:143")
    smtp = make("smtp.corp:25", "10.1.2.4:25")
    store.add(imap)
    store.add(smtp)
    assert store.load() == {imap.virtual: imap, smtp.virtual: smtp}
    assert MappingStore(store.path).load() == {imap.virtual: imap, smtp.virtual: smtp}
    assert store.remove(parse_host_port("MAIL.CORP:143")) == imap
    assert store.load() == {smtp.virtual: smtp}


def test_replace_keeps_the_others_and_refuses_an_unknown_address(store: MappingStore) -> None:
    imap = make("mail.corp:143", "10.1.2.3:143")
    smtp = make("smtp.corp:25", "10.1.2.4:25")
    store.add(imap)
    store.add(smtp)
    moved = make("MAIL.CORP:143", "10.9.9.9:143")
    assert store.replace(moved) == imap
    assert MappingStore(store.path).load() == {imap.virtual: moved, smtp.virtual: smtp}
    with pytest.raises(ConfigurationError, match=r"no mapping for virtual address pop.corp:110 \(existing: mail"):
        store.replace(make("pop.corp:110", "10.1.2.5:110"))
    assert store.load() == {imap.virtual: moved, smtp.virtual: smtp}


def test_file_is_private_and_readable_json(store: MappingStore) -> None:
    store.add(make())
    assert (store.path.stat().st_mode & 0o777) == 0o600
    document = json.loads(store.path.read_text())
    assert document["mappings"][0]["virtual"] == "mail.corp:143"
    assert [p.name for p in store.path.parent.iterdir()] == ["mappings.json"]  # no temporary file left


def test_write_is_atomic_old_file_survives_a_failed_write(store: MappingStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.add(make())
    before = store.path.read_bytes()

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        store.add(make("other.corp:143", "10.9.9.9:143"))
    monkeypatch.undo()
    assert store.path.read_bytes() == before
    assert [p.name for p in store.path.parent.iterdir()] == ["mappings.json"]


def test_duplicate_virtual_names_the_fix(store: MappingStore) -> None:
    store.add(make("mail.corp:143", "10.1.2.3:143"))
    with pytest.raises(ConfigurationError) as info:
        store.add(make("Mail.Corp:143", "10.7.7.7:143"))
    assert "mail.corp:143 is already mapped to 10.1.2.3:143" in str(info.value)
    assert "postbridge connector mapping remove mail.corp:143" in info.value.hint
    assert len(store.load()) == 1


def test_remove_unknown_lists_existing(store: MappingStore) -> None:
    store.add(make("mail.corp:143", "10.1.2.3:143"))
    store.add(make("smtp.corp:25", "10.1.2.4:25"))
    with pytest.raises(ConfigurationError) as info:
        store.remove(parse_host_port("pop.corp:110"))
    assert "pop.corp:110" in str(info.value)
    assert "existing: mail.corp:143, smtp.corp:25" in str(info.value)


def test_remove_from_empty_store_says_none(store: MappingStore) -> None:
    with pytest.raises(ConfigurationError, match=r"existing: none"):
        store.remove(parse_host_port("pop.corp:110"))


def test_version_changes_when_the_file_changes(store: MappingStore) -> None:
    store.add(make("mail.corp:143", "10.1.2.3:143"))
    first = store.version()
    assert first != (0, 0)
    store.add(make("smtp.corp:25", "10.1.2.4:25"))
    assert store.version() != first


def test_broken_json_names_the_file(store: MappingStore) -> None:
    store.path.parent.mkdir(parents=True)
    store.path.write_text('{"mappings": [')
    with pytest.raises(ConfigurationError) as info:
        store.load()
    assert str(store.path) in str(info.value)
    assert "not valid JSON" in str(info.value)


def test_wrong_document_shape_names_the_file(store: MappingStore) -> None:
    store.path.parent.mkdir(parents=True)
    store.path.write_text('[{"virtual": "a:1"}]')
    with pytest.raises(ConfigurationError, match="does not hold a mappings file") as info:
        store.load()
    assert str(store.path) in str(info.value)


def test_broken_entry_names_file_and_entry(store: MappingStore) -> None:
    store.add(make())
    document = json.loads(store.path.read_text())
    document["mappings"].append({"virtual": "b.corp:25", "internal": "10.0.0.1:25", "protocol": "udp"})
    store.path.write_text(json.dumps(document))
    with pytest.raises(ConfigurationError) as info:
        store.load()
    message = str(info.value)
    assert f"'{store.path}' entry 2" in message
    assert "'udp'" in message


def test_virtual_mapped_twice_in_the_file_is_an_error(store: MappingStore) -> None:
    entry = make().to_json()
    store.path.parent.mkdir(parents=True)
    store.path.write_text(json.dumps({"mappings": [entry, {**entry, "virtual": "MAIL.corp:143"}]}))
    with pytest.raises(ConfigurationError, match=r"entry 2: virtual address mail\.corp:143 is mapped twice"):
        store.load()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True), ("LOCALHOST.", True), ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True),
        ("[::1]", True), ("10.0.0.1", False), ("localhost.example", False), ("mail.corp.example", False), ("", False),
    ],
)  # fmt: skip
def test_is_loopback_knows_every_spelling_of_this_machine(host: str, loopback: bool) -> None:
    from postbridge.addresses import is_loopback

    assert is_loopback(host) is loopback
