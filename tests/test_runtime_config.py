"""The flows file loader: defaults, every kind of problem on its exact line, paths, retries, credentials, targets.

Cases mark the line a problem must be reported on with ``# <-``; the tests find that line in the text, so a case
and its expectation cannot drift apart.
"""

from __future__ import annotations

import json
import random
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from postbridge.addresses import HostPort
from postbridge.errors import ConfigurationError
from postbridge.mail.poller import Pop3PostProcessing, PostProcessing, SenderSettings
from postbridge.mail.settings import AuthMethod, Credentials, Protection, Proxy, channel_from_mapping
from postbridge.runtime.config import (
    CHANNEL_KEYS,
    EXAMPLE,
    FlowsFileError,
    Problem,
    RetryPolicy,
)
from postbridge.runtime.flows_file import load_flows
from postbridge.runtime.toml_lines import TomlLines

FLOW = """
[[flow]]
name = "{name}"
protocol = "imap"

[flow.sender]
address = "127.0.0.1:143"
user = "bob"
password = "secret"

[flow.target]
kind = "directory"
path = "out"
"""


class FakeResolver:
    """A credential store with fixed entries; an unknown name is refused like the real store refuses it."""

    def __init__(self, entries: dict[str, Credentials]) -> None:
        self.entries = entries
        self.asked: list[str] = []

    def resolve(self, name: str) -> Credentials:
        self.asked.append(name)
        if name not in self.entries:
            raise ConfigurationError(
                f"no credential named '{name}'", hint="add it with 'postbridge credentials add-password'"
            )
        return self.entries[name]


def write(folder: Path, text: str, name: str = "flows.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def marked_lines(path: Path) -> list[int]:
    return [number for number, line in enumerate(path.read_text().splitlines(), 1) if "# <-" in line]


def problems_of(path: Path, **kwargs: Any) -> tuple[Problem, ...]:
    with pytest.raises(FlowsFileError) as caught:
        load_flows(path, **kwargs)
    return caught.value.problems


# -- a valid file --------------------------------------------------------------------------------------------------


def test_a_valid_file_with_an_imap_and_a_pop3_flow_gets_every_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[flow]]
        name = "invoices"
        protocol = "imap"

        [flow.sender]
        address = "127.0.0.1:143"
        user = "bob"
        password = "secret"

        [flow.target]
        kind = "directory"
        path = "/var/spool/invoices"

        [[flow]]
        name = "support.pop3"
        protocol = "pop3"
        interval = 3

        [flow.sender]
        address = "[::1]:995"
        protection = "tls"
        credential = "support"

        [flow.retry]
        max_attempts = 2

        [flow.target]
        kind = "http"
        url = "https://tickets.example.com/mail"
        """,
    )
    resolver = FakeResolver({"support": Credentials("alice", "secret")})
    config = load_flows(path, credentials=resolver)
    assert (config.path, config.state, config.lease_seconds, config.worker) == (path, "sqlite", 60.0, "")
    assert config.metrics == HostPort("127.0.0.1", 9464)
    imap, pop3 = config.flows
    assert (imap.name, imap.protocol, imap.mode, imap.interval, imap.stale_after, imap.enabled, imap.line) == (
        "invoices", "imap", "poll", 60.0, 600.0, True, 1,
    )  # fmt: skip
    assert imap.channel.address == HostPort("127.0.0.1", 143)
    assert (imap.channel.proxy, imap.channel.protection, imap.channel.auth) == (
        Proxy.INTERNET, Protection.STARTTLS_MANDATORY, AuthMethod.PLAIN,
    )  # fmt: skip
    assert imap.channel.credentials == Credentials("bob", "secret")
    assert imap.channel.keystore is None and imap.channel.binding is None and imap.channel.timeout == 30.0
    assert imap.sender == SenderSettings()  # folder INBOX, unread, mark-read, Archive, Quarantine, 100, 25 MiB, 5
    assert imap.retry == RetryPolicy(max_attempts=5, initial=5.0, maximum=600.0, multiplier=2.0)
    assert dict(imap.target) == {"kind": "directory", "path": "/var/spool/invoices"}
    assert imap.target_source == f"{path} [flow.target] of flow 'invoices'"
    assert (pop3.name, pop3.protocol, pop3.mode, pop3.interval, pop3.line) == ("support.pop3", "pop3", "poll", 3.0, 14)
    assert pop3.stale_after == 60.0  # 10 x interval, but never below a minute
    assert pop3.pop3_post_processing is Pop3PostProcessing.DELETE
    assert pop3.sender.post_processing is PostProcessing.KEEP  # POP3 deletes through pop3_post_processing only
    assert pop3.sender.max_attempts == pop3.retry.max_attempts == 2
    assert pop3.channel.address == HostPort("::1", 995) and pop3.channel.protection is Protection.TLS
    assert pop3.channel.credentials == Credentials("alice", "secret") and resolver.asked == ["support"]
    assert "secret" not in repr(config)


def test_the_example_is_a_complete_valid_file(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    resolver = FakeResolver({name: Credentials(name, "pw") for name in ("invoices-mailbox", "support-mailbox")})
    checked: list[tuple[str, str]] = []
    config = load_flows(
        path, credentials=resolver, check_target=lambda table, source: checked.append((table["kind"], source))
    )
    invoices, support = config.flows
    assert (invoices.mode, invoices.sender.post_processing) == ("idle", PostProcessing.ARCHIVE_AND_MARK_READ)
    assert invoices.target["path"] == str(tmp_path / "spool" / "invoices")
    assert (support.protocol, support.pop3_post_processing) == ("pop3", Pop3PostProcessing.DELETE)
    assert support.target["headers"] == {"Authorization": "Bearer ${TICKETS_TOKEN}"}
    assert [kind for kind, _ in checked] == ["directory", "http"]


def test_channel_keys_are_exactly_what_channel_from_mapping_accepts() -> None:
    with pytest.raises(ConfigurationError) as caught:
        channel_from_mapping({"address": "127.0.0.1:143", "no-such-key": 1}, source="t")
    assert sorted(CHANNEL_KEYS) == caught.value.hint.removeprefix("known: ").split(", ")


# -- one problem at a time, each on its line -----------------------------------------------------------------------

A = FLOW.format(name="a")
POP3 = A.replace('"imap"', '"pop3"')


def edited(old: str, new: str, text: str = A) -> str:
    assert old in text
    return text.replace(old, new)


def runtime(line: str) -> str:
    return f"[runtime]\n{line}\n" + A


def sender_key(line: str, text: str = A) -> str:
    return edited('user = "bob"', f'{line}\nuser = "bob"', text)


PROBLEMS = [
    pytest.param(
        A + edited('name = "a"', 'name = "a"  # <-'), "is taken (first at line 2)", "its own name", id="duplicate name"
    ),
    pytest.param('[runtim]  # <-\nstate = "sqlite"\n' + A, "'runtim'", "'runtime'", id="unknown table"),
    pytest.param(runtime("lease_second = 30  # <-"), "'lease_second'", "'lease_seconds'", id="unknown runtime key"),
    pytest.param(
        edited('protocol = "imap"', "intervall = 5  # <-"), "'intervall'", "'interval'", id="unknown flow key"
    ),
    pytest.param(sender_key('foldr = "x"  # <-'), "'foldr'", "'folder'", id="unknown sender key"),
    pytest.param(
        A + "[flow.retry]\nmax_attempt = 3  # <-\n", "'max_attempt'", "'max_attempts'", id="unknown retry key"
    ),
    pytest.param(
        edited('"pop3"', '"pop3"\nmode = "idle"  # <-', POP3), "mode 'idle' needs IMAP", 'mode = "poll"', id="idle pop3"
    ),
    pytest.param(
        edited('protocol = "imap"', "interval = 300\nstale_after = 120  # <-"),
        "stale_after 120 is shorter than interval 300",
        "stale_after = 3000",
        id="stale_after below interval",
    ),
    pytest.param('[runtime]\nstate = "sqlite"\n', "no flow", "[[flow]]", id="no flows"),
    pytest.param(runtime('lease_seconds = "soon"  # <-'), "'soon'", "lease_seconds = 60", id="lease_seconds text"),
    pytest.param(runtime("lease_seconds = true  # <-"), "not a number", "= 60", id="lease_seconds boolean"),
    pytest.param(
        runtime("state = 5  # <-"), "state must be a string, not a number", 'state = "sqlite"', id="state int"
    ),
    pytest.param(runtime("metrics = 9464  # <-"), "metrics must be a string", "127.0.0.1:9464", id="metrics int"),
    pytest.param(runtime('metrics = "localhost"  # <-'), "has no port", "127.0.0.1:9464", id="metrics port"),
    pytest.param(runtime("worker = true  # <-"), "worker must be a string", "worker =", id="worker boolean"),
    pytest.param(
        runtime('state = "mysql://u:hunter2@db/x"  # <-'), "'mysql://u:***@db/x'", "postgresql://", id="state scheme"
    ),
    pytest.param(runtime('state = "sqlite:///"  # <-'), "'sqlite:///'", "sqlite:///abs/path.db", id="sqlite no path"),
    pytest.param(
        edited('kind = "directory"\n', "", edited("[flow.target]", "[flow.target]  # <-")),
        "'kind' is missing",
        "http, directory, smtp, python",
        id="target without kind",
    ),
    pytest.param(
        edited('kind = "directory"', 'kind = "directroy"  # <-'),
        "'directroy' is not one of: http, directory, smtp, python",
        'did you mean "directory"',
        id="unknown target kind",
    ),
    pytest.param(
        '[[flow]]  # <-\nname = "a"\n[flow.target]\nkind = "directory"\n',
        "[flow.sender] is missing",
        "address =",
        id="sender missing",
    ),
    pytest.param(
        '[[flow]]\nname = "a"\nsender = "imap"  # <-\n[flow.target]\nkind = "directory"\n',
        "'sender' must be a table, not a string",
        "[flow.sender]",
        id="sender not a table",
    ),
    pytest.param(
        sender_key('protection = "tsl"  # <-'), "protection 'tsl' is not one of", 'did you mean "tls"', id="protection"
    ),
    pytest.param(
        edited('address = "127.0.0.1:143"', 'address = "127.0.0.1"  # <-'), "has no port", "host:port", id="address"
    ),
    pytest.param(
        sender_key('protection = "none"  # <-'),
        "protection 'none' is not one of: off, starttls-mandatory",
        'e.g. protection = "starttls-mandatory"',  # the default, never "off"
        id="protection without a close match",
    ),
    pytest.param(
        sender_key('proxy = "on-premise"\nlocation_id = "dc1"\nbinding = "missing.json"  # <-'),
        "cannot read binding file",
        "relative path starts at the folder of flows.toml",
        id="binding missing",
    ),
    pytest.param(
        sender_key("timeout = true  # <-"),
        "timeout must be a number, not a boolean",
        "timeout = 30.0",
        id="timeout boolean",
    ),
    pytest.param(
        edited('password = "secret"\n', "", edited('user = "bob"', 'user = "bob"  # <-')),
        "without a password",
        "credential =",
        id="user without password",
    ),
    pytest.param(
        sender_key('post_processing = "mark-red"  # <-'),
        "'mark-red' is not one of",
        'did you mean "mark-read"',
        id="post_processing",
    ),
    pytest.param(
        sender_key('post_processing = "mark-read"  # <-', POP3),
        "is not one of: delete, keep",
        'post_processing = "delete"',
        id="pop3 post_processing",
    ),
    pytest.param(sender_key('folder = "INBOX"  # <-', POP3), "no meaning for POP3", "remove it", id="pop3 folder"),
    pytest.param(sender_key("max_messages_per_poll = 0  # <-"), "at least 1", "= 100", id="max_messages_per_poll"),
    pytest.param(
        edited('name = "a"', 'name = "Invoices 2024"  # <-'), "'Invoices 2024'", 'name = "invoices"', id="bad name"
    ),
    pytest.param(
        edited('name = "a"\n', "", edited("[[flow]]", "[[flow]]  # <-")), "name is missing", "name =", id="no name"
    ),
    pytest.param(
        A + "[flow.retry]\ninitial = 10\nmaximum = 5  # <-\n",
        "maximum 5 is below initial 10",
        "maximum = 600",
        id="retry maximum below initial",
    ),
    pytest.param(
        edited('protocol = "imap"', 'enabled = "maybe"  # <-'),
        "'maybe' is not true or false",
        "enabled = true",
        id="enabled",
    ),
    pytest.param(edited('protocol = "imap"', "protocol = imap  # <-"), "not valid TOML", "line 3", id="TOML syntax"),
]


@pytest.mark.parametrize(("text", "in_message", "in_hint"), PROBLEMS)
def test_each_problem_is_reported_on_its_line_with_a_fix(
    text: str, in_message: str, in_hint: str, tmp_path: Path
) -> None:
    path = write(tmp_path, text)
    [problem] = problems_of(path, credentials=FakeResolver({}))
    expected = marked_lines(path)
    assert [problem.line] == (expected or [None])
    assert in_message in problem.message and in_hint in problem.hint
    rendered = problem.render(path)
    assert rendered.startswith(f"{path}:{problem.line}: " if problem.line else f"{path}: ")
    assert "hunter2" not in rendered and "secret" not in rendered


def test_several_problems_are_all_reported_in_line_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [runtime]
        state = "redis://cache"             # <-
        lease_seconds = 0                   # <-

        [[flow]]
        name = "first"
        protocol = "pop3"
        mode = "idle"                       # <-

        [flow.sender]
        address = "127.0.0.1:110"
        user = "bob"
        password = "secret"
        selektion = "all"                   # <-

        [flow.target]
        kind = "ftp"                        # <-

        [[flow]]
        name = "second"
        interval = 60
        stale_after = 30                    # <-

        [flow.sender]
        address = "127.0.0.1:143"
        credential = "nobody"               # <-

        [flow.retry]
        multiplier = 0.5                    # <-

        [flow.target]
        kind = "directory"
        path = "out"

        [[flow]]
        name = "first"                      # <-
        [flow.sender]
        address = "127.0.0.1:143"
        auth = "none"
        [flow.target]
        kind = "python"
        callable = "x:y"
        """,
    )
    checked: list[str] = []
    found = problems_of(path, credentials=FakeResolver({}), check_target=lambda table, source: checked.append(source))
    assert [problem.line for problem in found] == marked_lines(path)
    with pytest.raises(FlowsFileError) as caught:
        load_flows(path, credentials=FakeResolver({}))
    assert caught.value.message == f"{path}: 9 problems in the flows file"
    rendered = caught.value.render().splitlines()
    assert len(rendered) == 9 and rendered[0].startswith(f"{path}:2: [runtime]: state 'redis://cache' is not")
    assert checked == []  # every flow had a problem of its own: no target was built


# -- paths, retries, credentials, targets --------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_flows_file_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    binding = {
        "onpremise_proxy_host": "127.0.0.1", "onpremise_socks5_proxy_port": 20004,
        "clientid": "sub-1", "clientsecret": "client-secret",
    }  # fmt: skip
    (folder / "binding.json").write_text(json.dumps(binding))
    write(
        folder,
        """
        [[flow]]
        name = "onprem"

        [flow.sender]
        address = "mail.corp.example:143"
        proxy = "on-premise"
        location_id = "dc1"
        binding = "binding.json"
        keystore = "trust"
        auth = "none"

        [flow.target]
        kind = "http"
        url = "https://api.example.com/in"
        ca_file = "certs/ca.pem"
        path = "/abs/untouched"
        headers = { name = "relative/not/a/path" }
        """,
    )
    monkeypatch.chdir(tmp_path)  # somewhere else: paths must not depend on the working folder
    [flow] = load_flows(Path("conf/flows.toml")).flows
    assert flow.channel.binding is not None and flow.channel.binding.subaccount == "sub-1"
    assert flow.channel.keystore == folder / "trust"
    assert flow.target["ca_file"] == str(folder / "certs" / "ca.pem")
    assert flow.target["path"] == "/abs/untouched"
    assert flow.target["headers"] == {"name": "relative/not/a/path"}
    assert flow.target["url"] == "https://api.example.com/in"


def test_retry_delay_grows_is_capped_and_jitters_within_bounds() -> None:
    policy = RetryPolicy(max_attempts=5, initial=5.0, maximum=60.0, multiplier=2.0)
    assert [policy.delay(attempt, jitter=0) for attempt in range(1, 7)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    assert policy.delay(100_000, jitter=0) == 60.0  # no overflow for a message retried forever
    rng = random.Random(42)
    delays = [policy.delay(3, rng=rng) for _ in range(500)]
    assert all(18.0 <= delay <= 22.0 for delay in delays)
    assert min(delays) < 18.5 and max(delays) > 21.5  # the whole +-10% band is used
    assert [policy.delay(3, rng=random.Random(7)) for _ in range(3)] == [policy.delay(3, rng=random.Random(7))] * 3
    with pytest.raises(ValueError):
        policy.delay(0)
    with pytest.raises(ConfigurationError, match="maximum 1 is below initial 5"):
        RetryPolicy(maximum=1.0)


def test_credential_names_are_resolved_and_an_unknown_one_is_a_problem_on_its_line(tmp_path: Path) -> None:
    text = FLOW.format(name="a").replace('user = "bob"\npassword = "secret"', 'credential = "corp"  # <-')
    path = write(
        tmp_path,
        text + FLOW.format(name="b").replace('user = "bob"\npassword = "secret"', 'credential = "nobody"  # <-'),
    )
    resolver = FakeResolver({"corp": Credentials("bob", "s3cret-password")})
    [problem] = problems_of(path, credentials=resolver)
    assert problem.line == marked_lines(path)[1]
    assert problem.message == (
        "[flow.sender] of flow 'b': credential 'nobody' cannot be used: no credential named 'nobody'"
    )
    assert problem.hint == "add it with 'postbridge credentials add-password'"
    assert resolver.asked == ["corp", "nobody"]
    path.write_text(text)
    [flow] = load_flows(path, credentials=resolver).flows
    assert flow.channel.credentials == Credentials("bob", "s3cret-password")
    [without_store] = problems_of(path)
    assert without_store.line == marked_lines(path)[0] and "no credential store" in without_store.message


def test_check_target_sees_the_resolved_table_and_its_error_lands_on_the_target_line(tmp_path: Path) -> None:
    bad_flow = FLOW.format(name="broken").replace('protocol = "imap"', 'protocol = "smtp"  # <-')
    text = FLOW.format(name="a") + bad_flow + FLOW.format(name="b").replace("[flow.target]", "[flow.target]  # <-")
    path = write(tmp_path, text)
    calls: list[tuple[dict[str, Any], str]] = []

    def check_target(table: Mapping[str, Any], source: str) -> None:
        calls.append((dict(table), source))
        if source.endswith("'b'"):
            raise ConfigurationError(f"{source}: path '/x' is not writable", hint="choose a folder you own")

    found = problems_of(path, check_target=check_target)
    assert [(problem.line, problem.message, problem.hint) for problem in found] == [
        (marked_lines(path)[0], "flow 'broken': protocol 'smtp' is not one of: imap, pop3", 'e.g. protocol = "imap"'),
        (marked_lines(path)[1], "[flow.target] of flow 'b': path '/x' is not writable", "choose a folder you own"),
    ]
    assert calls == [
        ({"kind": "directory", "path": str(tmp_path / "out")}, f"{path} [flow.target] of flow 'a'"),
        ({"kind": "directory", "path": str(tmp_path / "out")}, f"{path} [flow.target] of flow 'b'"),
    ]  # not for 'broken', whose own settings are wrong


def test_an_unreadable_file_is_a_configuration_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "flows.toml"
    with pytest.raises(ConfigurationError, match=r"nowhere/flows\.toml") as caught:
        load_flows(missing)
    assert not isinstance(caught.value, FlowsFileError) and "flows example" in caught.value.hint
    with pytest.raises(ConfigurationError, match="cannot read the flows file"):
        load_flows(tmp_path)  # a folder


def test_a_syntax_error_at_the_end_of_the_file_points_at_the_last_line(tmp_path: Path) -> None:
    path = write(tmp_path, FLOW.format(name="a") + 'note = """never closed\n')
    [problem] = problems_of(path)
    assert problem.line == len(path.read_text().splitlines()) and "not valid TOML" in problem.message


# -- the line locator ----------------------------------------------------------------------------------------------


def test_toml_lines_skips_strings_arrays_and_comments_that_look_like_headers() -> None:
    text = textwrap.dedent(
        '''\
        [runtime]
        state = "sqlite"   # [[flow]] in a comment
        note = """
        [[flow]]
        name = "in a string"
        """
        matrix = [
          [1, 2],
          [3, 4],
        ]
        'quoted key' = 1

        [[flow]]
        name = "a"
        sender.address = "h:1"
        [flow.target]
        kind = "directory"

        [[ flow ]]
        "name" = 'b'
        [flow . target]
        path = \'\'\'
        x = 1
        \'\'\'
        kind = "http"
        '''
    )
    lines = TomlLines(text)
    assert lines.line("runtime", "state") == 2
    assert lines.line("runtime", "note") == 3 and lines.line("runtime", "matrix") == 7
    assert lines.line("runtime", "quoted key") == 11
    assert lines.line("flow", 0) == 13 and lines.line("flow", 0, "name") == 14
    assert lines.line("flow", 0, "sender", "address") == 15
    assert lines.line("flow", 0, "sender", "folder") == 15  # falls back to where sender was defined
    assert lines.line("flow", 0, "target", "kind") == 17
    assert lines.line("flow", 1) == 19 and lines.line("flow", 1, "name") == 20
    assert lines.line("flow", 1, "target") == 21 and lines.line("flow", 1, "target", "kind") == 25
    assert lines.exact("flow", 1, "target", "x") is None and lines.exact("flow", 2) is None
    assert lines.line("flow", 1, "retry", "initial") == 19  # no [flow.retry]: the flow's header
