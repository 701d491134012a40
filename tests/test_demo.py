"""``postbridge demo``: the whole story as a user runs it (``--once`` and the keep-running phase), a step that misses
its expectation, and the home."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import select
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from postbridge.demo import cases
from postbridge.demo.command import MARKER, run_demo

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}


def test_demo_once_tells_the_whole_story_and_cleans_up(tmp_path: Path) -> None:
    """How fast it shows results is measured by bench/demo.py, not here."""
    env = {**ENV, "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "postbridge", "demo", "--once"], capture_output=True, text=True, timeout=120, env=env
    )
    output, errors = result.stdout, result.stderr
    assert result.returncode == 0, output + errors
    assert output.startswith("postbridge demo")
    text = " ".join(output.split())  # rich wraps long lines
    # step 1: both mappings, checked through the tunnel
    assert "availability check mail.corp.example:143: reachable (IMAP greeting" in text
    assert "availability check mail.corp.example:993: reachable (TLS 1.3, IMAP greeting" in text
    # step 2: unknown CA first, the lab root and intermediate added, then the test passes; 'off' over tcp-tls
    assert "STARTTLS refused the lab certificate" in text
    assert "keystore: added 'lab-root'" in text and "keystore: added 'lab-intermediate'" in text
    assert "trusted through keystore 'lab-root'" in text
    assert "protection 'off' over the tcp-tls mapping mail.corp.example:993 passes" in text
    # step 3: mail through the tunnel, polled back by a flow into a folder
    assert "sent 3 mails to alice through mail.corp.example:587" in text
    assert "all 3 mails are in the folder, each once" in text
    for number in (4711, 4712, 4713):
        assert f"Order {number}: delivery note" in text
    # step 4: the three classic errors, each with the connection test's diagnosis
    assert 'SOCKS5 reply 0x02 "Connection not allowed by ruleset" for mail.corp.example:1143' in text
    assert "did you mean mail.corp.example:143?" in text
    assert 'SOCKS5 reply 0x04 "Host unreachable" for mail-old.corp.example:143' in text
    assert "the connector already speaks TLS to the server (mapping 'tcp-tls'), so the channel must not" in text
    assert re.search(r'\{"event": "access-denied".*"virtual": "mail\.corp\.example:1143"\}', output)
    for number in range(5):
        assert f"step {number} passed" in output
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
    wrong = dataclasses.replace(cases.ERROR_CASES[0], cause="Host unreachable")
    monkeypatch.setattr(cases, "ERROR_CASES", (wrong, *cases.ERROR_CASES[1:]))
    handlers_before = list(logging.getLogger("postbridge").handlers)

    out = io.StringIO()
    code = run_demo(once=True, home=home, console=Console(file=out, width=120))

    output = out.getvalue()
    assert code == 1, output
    assert "expected a failure saying 'Host unreachable'" in output
    assert "step 4 FAILED" in output
    assert "step(s) 4 did not meet their expectation" in output
    for number in range(4):
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


def test_demo_keeps_running_with_the_web_uis_and_the_flow_until_ctrl_c(tmp_path: Path) -> None:
    env = {**ENV, "TMPDIR": str(tmp_path), "COLUMNS": "400"}
    process = subprocess.Popen(
        [sys.executable, "-m", "postbridge", "demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    seen = bytearray()
    try:
        assert process.stdout is not None
        output = _read_until(process, seen, "Press Ctrl-C to stop.", timeout=60)
        lines = output.splitlines()
        ui = re.search(r"connector UI\s+(http://127\.0\.0\.1:\d+/)\s+password (\S+)", output)
        cockpit = re.search(r"cloud cockpit\s+(https://127\.0\.0\.1:\d+/cockpit/)\s+password (\S+)", output)
        ca = re.search(r"from the hub's own CA, (\S+): your browser", output)
        assert ui and cockpit and ca, output

        with httpx.Client(base_url=ui.group(1)) as client:  # the connector UI: log in, see the mappings
            assert client.post("/api/v1/login", json={"password": ui.group(2)}).status_code == 200
            assert "mail.corp.example:993" in client.get("/mappings").text
        verify = ssl.create_default_context(cafile=ca.group(1))
        base = cockpit.group(1).removesuffix("/cockpit/")
        with httpx.Client(base_url=base, verify=verify) as client:  # the cockpit's certificate verifies (hub CA)
            assert client.get("/cockpit/", follow_redirects=True).status_code == 200
            assert client.post("/api/v1/login", json={"password": cockpit.group(2)}).status_code == 200
            [flow] = client.get("/api/v1/cockpit/flows").json()  # it shows the demo's flows file and its health
            assert flow["name"] == "alice-inbox" and flow["status"] == "healthy", flow
            assert flow["counts"]["post-processed"] == 3, flow

        send = next(line.strip() for line in lines if " mail send " in line)
        sent = subprocess.run(send, shell=True, capture_output=True, text=True, timeout=60, env=ENV)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        inbox = re.search(r"watch (\S+/inbox)", output)
        assert inbox, output
        folder = Path(inbox.group(1))
        arrival = "flow 'alice-inbox': 'Hello from the cloud' from bob@corp.example -> "
        announced = _read_until(process, seen, arrival, timeout=30)  # the flow polls every 5 s and says so
        path = announced.split(arrival, 1)[1].split()[0]
        assert Path(path).parent == folder and "Subject: Hello from the cloud" in Path(path).read_text()

        process.send_signal(signal.SIGINT)
        rest, errors = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, rest.decode() + errors.decode()
    assert "stopping: the flow, the connector, the hub and the lab server" in rest.decode()
    assert list(tmp_path.iterdir()) == []  # the temporary home is gone


def _read_until(process: subprocess.Popen[bytes], seen: bytearray, text: str, *, timeout: float) -> str:
    """Read the process's stdout (unbuffered, into ``seen``) until ``text`` appeared; return all output so far."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{text!r} did not appear within {timeout:g} s:\n{seen.decode(errors='replace')}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"the demo ended before {text!r}:\n{seen.decode(errors='replace')}")
            seen += chunk
    return seen.decode(errors="replace")
