"""Enrollment, renewal, bindings and the home folder, through the real CLI and a running hub."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from postbridge.cloud.state import EnrollmentToken
from postbridge.trust import pki
from tests.harness import Stack, cli, socks_connect

pytestmark = pytest.mark.e2e


def test_home_folder_is_private_and_follows_the_environment(tmp_path: Path) -> None:
    env_home, cli_home = tmp_path / "from-env", tmp_path / "from-option"
    env = {**os.environ, "POSTBRIDGE_HOME": str(env_home)}
    command = [sys.executable, "-m", "postbridge", "cloud", "init", "--hostname", "localhost"]
    subprocess.run(command, env=env, check=True, capture_output=True)
    assert (env_home / "cloud" / "ca.pem").exists()
    subprocess.run([*command[:3], "--home", str(cli_home), *command[3:]], env=env, check=True, capture_output=True)
    assert (cli_home / "cloud" / "ca.pem").exists()  # the option wins over the environment
    for home in (env_home, cli_home):
        assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(home / "cloud" / "ca.key").st_mode) == 0o600


def test_enrollment_token_is_one_time_and_pins_the_hub(stack: Stack) -> None:
    token = json.loads(cli(stack.cloud_home, "cloud", "enroll", "acme", "--location", "dc1", "--json").stdout)["token"]
    decoded = EnrollmentToken.decode(token)
    assert decoded.ca_fingerprint == pki.fingerprint(
        pki.load_certificates((stack.cloud_home / "cloud" / "ca.pem").read_bytes())[0]
    )
    assert decoded.expires_at - time.time() == pytest.approx(15 * 60, abs=30)
    first = cli(stack.root / "c1", "connector", "enroll", "--cloud", f"127.0.0.1:{stack.tunnel_port}", "--token", token)
    assert "enrolled as connector" in first.stdout
    again = cli(
        stack.root / "c2",
        "connector",
        "enroll",
        "--cloud",
        f"127.0.0.1:{stack.tunnel_port}",
        "--token",
        token,
        check=False,
    )
    assert again.returncode == 1
    assert "already used" in again.stderr
    assert not (stack.root / "c2" / "connector" / "identity.json").exists()


def test_expired_token_is_refused(stack: Stack) -> None:
    token = json.loads(
        cli(stack.cloud_home, "cloud", "enroll", "acme", "--location", "dc1", "--ttl", "0", "--json").stdout
    )["token"]
    result = cli(
        stack.root / "c1",
        "connector",
        "enroll",
        "--cloud",
        f"127.0.0.1:{stack.tunnel_port}",
        "--token",
        token,
        check=False,
    )
    assert result.returncode == 1
    assert "expired" in result.stderr
    assert "postbridge cloud enroll" in result.stderr  # the fix is named


def test_token_of_another_hub_is_refused_before_any_secret_is_sent(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = Stack(tmp_path_factory.mktemp("other-hub")).init()
    token = json.loads(cli(other.cloud_home, "cloud", "enroll", "acme", "--location", "dc1", "--json").stdout)["token"]
    result = cli(
        stack.root / "c1",
        "connector",
        "enroll",
        "--cloud",
        f"127.0.0.1:{stack.tunnel_port}",
        "--token",
        token,
        check=False,
    )
    assert result.returncode == 1
    assert "but the token pins" in result.stderr
    assert "not known" not in (stack.hub.log() if stack.hub else "")  # the token never reached this hub


def test_damaged_token_names_the_problem(stack: Stack) -> None:
    result = cli(
        stack.root / "c1",
        "connector",
        "enroll",
        "--cloud",
        f"127.0.0.1:{stack.tunnel_port}",
        "--token",
        "pbe1.garbage",
        check=False,
    )
    assert result.returncode == 2
    assert "damaged" in result.stderr


def test_renewal_replaces_the_certificate_and_the_tunnel_keeps_working(stack: Stack, line_server: int) -> None:
    connector = stack.enroll("dc1")
    stack.map(connector, "svc.corp.example:25", f"127.0.0.1:{line_server}")
    credentials = connector.home / "connector" / "client.pem"
    before = pki.load_certificates(credentials.read_bytes())[0]
    stack.start_connector(connector)
    result = cli(connector.home, "connector", "renew")
    assert "renewed" in result.stdout
    after = pki.load_certificates(credentials.read_bytes())[0]
    assert after.serial_number != before.serial_number
    assert pki.ConnectorIdentity.from_certificate(after) == pki.ConnectorIdentity.from_certificate(before)
    # the new certificate is accepted for a fresh tunnel
    assert connector.process is not None
    connector.process.stop()
    stack.start_connector(connector)
    reply, sock = socks_connect(stack.socks_port, "svc.corp.example", 25, "acme/dc1", stack.secret)
    with sock:
        assert reply == 0
    audit = (connector.home / "connector" / "audit.log").read_text()
    assert "renew-certificate" in audit


def test_binding_has_what_a_cloud_application_needs(stack: Stack) -> None:
    binding = json.loads(
        cli(
            stack.cloud_home,
            "cloud",
            "binding",
            "acme",
            "--secret",
            stack.secret,
            "--socks",
            f"127.0.0.1:{stack.socks_port}",
            "--api",
            f"127.0.0.1:{stack.ports['api']}",
        ).stdout
    )
    assert binding["onpremise_proxy_host"] == "127.0.0.1"
    assert binding["onpremise_socks5_proxy_port"] == stack.socks_port
    assert binding["token_service_url"] == f"https://127.0.0.1:{stack.ports['api']}/oauth/token"
    assert binding["clientid"] == "acme" and binding["clientsecret"] == stack.secret
    assert "BEGIN CERTIFICATE" in binding["ca_certificate"]
    wrong = cli(stack.cloud_home, "cloud", "binding", "acme", "--secret", "nope", check=False)
    assert wrong.returncode == 1


def test_hub_api_lists_connectors_with_their_mappings(stack: Stack, line_server: int) -> None:
    connector = stack.enroll("dc1")
    stack.map(connector, "svc.corp.example:25", f"127.0.0.1:{line_server}", "--description", "test service")
    stack.start_connector(connector)
    [listed] = stack.connected()
    assert listed["location"] == "dc1"
    assert listed["mappings"][0]["virtual"] == "svc.corp.example:25"
    assert listed["mappings"][0]["description"] == "test service"
    import httpx

    refused = httpx.get(
        f"{stack.api_url}/v1/connectors", headers={"authorization": "Bearer x.y.z"}, verify=stack.ca_context()
    )
    assert refused.status_code == 401
    bad_client = httpx.post(
        f"{stack.api_url}/oauth/token",
        data={"grant_type": "client_credentials", "client_id": "acme", "client_secret": "no"},
        verify=stack.ca_context(),
    )
    assert bad_client.status_code == 401
    assert bad_client.json()["error"] == "invalid_client"


def test_no_secret_reaches_any_log(stack: Stack, line_server: int) -> None:
    connector = stack.enroll("dc1")
    stack.map(connector, "svc.corp.example:25", f"127.0.0.1:{line_server}")
    stack.start_connector(connector)
    token = stack.token()
    for user, password in (("acme/dc1", stack.secret), ("acme/dc1", "a-wrong-secret")):
        _, sock = socks_connect(stack.socks_port, "svc.corp.example", 25, user, password)
        sock.close()
    logs = [stack.root / "hub.log", *stack.root.glob("connector-*.log"), *stack.root.rglob("*.log")]
    text = "\n".join(path.read_text(errors="replace") for path in logs if path.is_file())
    assert stack.secret not in text
    assert "a-wrong-secret" not in text
    assert token not in text
    enrollment_secret = EnrollmentToken.decode(
        json.loads(cli(stack.cloud_home, "cloud", "enroll", "acme", "--json").stdout)["token"]
    ).secret
    assert enrollment_secret not in text


def test_enrolling_an_enrolled_home_again_needs_force(stack: Stack) -> None:
    connector = stack.enroll("dc1")
    token = json.loads(cli(stack.cloud_home, "cloud", "enroll", "acme", "--location", "dc2", "--json").stdout)["token"]
    cloud = f"127.0.0.1:{stack.tunnel_port}"
    refused = cli(connector.home, "connector", "enroll", "--cloud", cloud, "--token", token, check=False)
    assert refused.returncode == 2
    assert "already enrolled" in refused.stderr and "--force" in refused.stderr
    cli(connector.home, "connector", "enroll", "--cloud", cloud, "--token", token, "--force")
    assert json.loads((connector.home / "connector" / "identity.json").read_text())["location"] == "dc2"


def test_revoked_connector_is_told_why(stack: Stack) -> None:
    connector = stack.enroll("dc1")
    certificates = stack.cloud_home / "cloud" / "certificates.json"
    entries = json.loads(certificates.read_text())
    for entry in entries.values():
        entry["revoked"] = True
    certificates.write_text(json.dumps(entries))
    process = stack.start_connector(connector, wait=False)
    deadline = time.monotonic() + 15
    while "revoked or unknown" not in process.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "connector certificate is revoked or unknown to this hub - enroll the connector again" in process.log()


def test_api_runs_a_connectors_availability_check(stack: Stack, line_server: int) -> None:
    import httpx

    connector = stack.enroll("dc1")
    stack.map(connector, "svc.corp.example:25", f"127.0.0.1:{line_server}")
    stack.start_connector(connector)
    headers = {"authorization": f"Bearer {stack.token()}"}
    url = f"{stack.api_url}/v1/locations/dc1/check"
    answer = httpx.post(url, json={"virtual": "svc.corp.example:25"}, headers=headers, verify=stack.ca_context())
    assert answer.status_code == 200, answer.text
    assert answer.json()["reachable"] is True
    assert answer.json()["protocol_seen"] == "SMTP"
    unmapped = httpx.post(url, json={"virtual": "nope.corp.example:25"}, headers=headers, verify=stack.ca_context())
    assert unmapped.status_code == 404
    assert "no mapping" in unmapped.json()["error"]


def test_log_files_are_private(stack: Stack) -> None:
    connector = stack.enroll("dc1")
    stack.start_connector(connector)
    for path in (stack.cloud_home / "cloud" / "hub.log", connector.home / "connector" / "trace.log"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
