"""Run the JDK's own SOCKS5 client (tests/java/SocksProbe.java) against a proxy, to see what Java apps see.

Owns: compiling SocksProbe.java with javac once (cached in the system temp dir by the source's hash, so a
session compiles at most once and later sessions not at all) and running it.
Must not: download anything, or keep a JVM running after a call returns.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import LOOPBACK, find_executable

SOURCE = Path(__file__).resolve().parent.parent / "java" / "SocksProbe.java"
JDK_CANDIDATES_JAVAC = (
    "/usr/lib/jvm/java-17-openjdk-amd64/bin/javac",
    "/usr/lib/jvm/java-17-openjdk-arm64/bin/javac",
)
# Start the JVM quickly: the probe is tiny and short-lived.
JVM_FLAGS = ("-Xshare:auto", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")


def compiled_probe_dir() -> Path:
    """The folder holding SocksProbe.class for the current source, compiling it first when needed.

    Skips the test (fails it with CI=true) when javac is missing; raises RuntimeError when javac fails.
    """
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / f"postbridge-socksprobe-{digest}"
    if (target / "SocksProbe.class").exists():
        return target
    javac = find_executable("javac", JDK_CANDIDATES_JAVAC)
    staging = Path(tempfile.mkdtemp(prefix="postbridge-socksprobe-build-"))
    result = subprocess.run(
        [str(javac), "-d", str(staging), str(SOURCE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"javac failed on {SOURCE} (exit {result.returncode}):\n{result.stderr}")
    try:
        os.rename(staging, target)  # atomic: a concurrent compile of the same source just loses the race
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "SocksProbe.class").exists():
            raise
    return target


def run_socks_probe(
    proxy_port: int,
    user: str,
    password: str,
    host: str,
    port: int,
    *,
    proxy_host: str = LOOPBACK,
    timeout: float = 60.0,
) -> tuple[int, str]:
    """Connect with Java's SOCKS5 client via `proxy_host:proxy_port` to `host:port` (name left unresolved).

    Returns (exit code, output): (0, "CONNECTED <greeting line>") or (1, "ERROR <class>: <message>"), e.g.
    "ERROR java.net.SocketException: SOCKS: Connection not allowed by ruleset". When the JVM prints nothing
    on stdout the output is its stderr. Raises subprocess.TimeoutExpired after `timeout` seconds.
    """
    classes = compiled_probe_dir()
    java = find_executable("java", [str(Path(c).with_name("java")) for c in JDK_CANDIDATES_JAVAC])
    probe_args = (proxy_host, str(proxy_port), user, password, host, str(port))
    result = subprocess.run(
        [str(java), *JVM_FLAGS, "-cp", str(classes), "SocksProbe", *probe_args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    output = result.stdout.strip() or result.stderr.strip()
    return result.returncode, output
