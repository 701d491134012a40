"""``postbridge demo``: the whole tunnel story as a user runs it, a step that misses its expectation, and the home."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from postbridge.demo import cases
from postbridge.demo.command import MARKER, run_demo
from postbridge.demo.onprem import GREETING, respond

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
REPLIES = {
    0x02: "Connection not allowed by ruleset",
    0x03: "Network unreachable",
    0x04: "Host unreachable",
    0x05: "Connection refused",
}


def test_demo_once_tells_the_tunnel_story_and_cleans_up(tmp_path: Path) -> None:
    env = {**ENV, "TMPDIR": str(tmp_path)}
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "postbridge", "demo", "--once"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert process.stdout is not None
        first = b""
        while not first.endswith(b"\n"):  # byte by byte from the pipe: nothing may stay in a reader's buffer
            chunk = os.read(process.stdout.fileno(), 1)
            if not chunk:
                break
            first += chunk
        first_output = time.monotonic() - started
        rest, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    elapsed = time.monotonic() - started
    output = (first + rest).decode()
    errors = stderr.decode()
    assert process.returncode == 0, output + errors
    assert output.startswith("postbridge demo")
    assert first_output < 5, f"first output after {first_output:.1f} s"
    assert elapsed < 15, f"the --once run took {elapsed:.1f} s"
    assert f"mail.corp.example:143 (tcp) through the tunnel: {GREETING}" in output
    assert f"mail.corp.example:993 (tcp-tls) through the tunnel: {GREETING}" in output
    for code, words in REPLIES.items():
        assert f"reply 0x{code:02x}: {words}" in output
    assert "'postbridge connector mapping add mail.corp.example:25 --to HOST:PORT'" in output  # the 0x02 diagnosis
    assert re.search(r'\{"event": "access-denied".*"virtual": "mail\.corp\.example:25"\}', output)
    assert "every step met its expectation" in output
    assert errors == ""  # hub and connector log to the demo's log file, not to the terminal
    assert "hub listening" not in output
    shown = re.search(r"^home: (\S+) \(temporary", output, re.MULTILINE)
    assert shown, output
    home = Path(shown.group(1))
    assert home.parent == tmp_path
    assert not home.exists()
    assert list(tmp_path.iterdir()) == []


def test_once_exits_1_when_a_step_misses_its_expectation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "demo-home"
    wrong = dataclasses.replace(cases.ERROR_CASES[0], expected_reply=0x04)
    monkeypatch.setattr(cases, "ERROR_CASES", (wrong, *cases.ERROR_CASES[1:]))
    handlers_before = list(logging.getLogger("postbridge").handlers)

    out = io.StringIO()
    code = run_demo(once=True, home=home, console=Console(file=out, width=120))

    output = out.getvalue()
    assert code == 1, output
    assert "reply 0x02 (Connection not allowed by ruleset), but expected 0x04 (Host unreachable)" in output
    assert "step 5 FAILED" in output
    assert "step(s) 5 did not meet their expectation" in output
    for number in range(1, 5):
        assert f"step {number} passed" in output
    assert logging.getLogger("postbridge").handlers == handlers_before  # logging is put back as it was
    assert "Access Denied" in (home / "demo.log").read_text()  # --home is kept, with its log
    assert (home / MARKER).exists()

    monkeypatch.undo()  # the right expectations again, in the same home: the old state is replaced
    out = io.StringIO()
    assert run_demo(once=True, home=home, console=Console(file=out, width=120)) == 0, out.getvalue()
    assert "every step met its expectation" in out.getvalue()


def test_home_with_foreign_content_is_refused_and_left_alone(tmp_path: Path) -> None:
    home = tmp_path / "mine"
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    result = subprocess.run(
        [sys.executable, "-m", "postbridge", "demo", "--once", "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is not empty and was not made by 'postbridge demo'" in " ".join(result.stderr.split())  # rich wraps
    assert [p.name for p in home.iterdir()] == ["notes.txt"]
    assert (home / "notes.txt").read_text() == "keep me"


def test_onprem_server_answers_logout_capability_and_nothing_else() -> None:
    assert respond(b"a LOGOUT\r\n") == (b"* BYE demo server logging out\r\na OK LOGOUT completed\r\n", True)
    assert respond(b"x1 capability\r\n") == (b"* CAPABILITY IMAP4rev1\r\nx1 OK CAPABILITY completed\r\n", False)
    answer, done = respond(b"a LOGIN alice secret\r\n")
    assert answer.startswith(b"a BAD ") and not done
    answer, done = respond(b"\x1b[31m LOGOUT\r\n")  # a tag that is not letters and digits is not echoed
    assert answer.endswith(b"* OK LOGOUT completed\r\n") and done
    assert respond(b"\r\n") == (b"", False)
