"""A scripted fake mail server on 127.0.0.1 that plays an attacker (or a broken server) and records everything.

Owns: running a *scenario* - a list of steps (:class:`Send`, :class:`Expect`, :class:`StartTls`, :class:`Close`)
- against every connection a client opens, recording the bytes received before TLS, during the handshake and
after it, and the checks built on that record (:func:`cleartext_leaks`). TLS runs over memory BIOs so that every
byte the client sends before the handshake completes is seen in clear, even bytes a failed handshake swallowed.
Works for IMAP (``Expect(..., tagged=True)`` remembers the client's tag; ``{tag}`` and ``{next_tag}`` in
:class:`Send` data are replaced by it and its successor), POP3 and SMTP.

Must not: listen anywhere but loopback, raise in its threads (every failure is recorded in the transcript), or
speak any protocol beyond its script.
"""

from __future__ import annotations

import base64
import contextlib
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from tests.servers import LOOPBACK

#: Words that start a command carrying or announcing credentials (IMAP after the tag, POP3 and SMTP first).
AUTH_COMMANDS = frozenset({b"LOGIN", b"AUTHENTICATE", b"USER", b"PASS", b"AUTH", b"APOP"})
_PRINTABLE = re.compile(rb"[\x20-\x7e]+")


@dataclass(frozen=True)
class Send:
    """Send ``data`` (``{tag}``/``{next_tag}`` replaced), after waiting ``delay`` seconds (a separate segment)."""

    data: bytes
    delay: float = 0.0


@dataclass(frozen=True)
class Expect:
    """Read one line; it must start with ``prefix`` (case-insensitive), after the IMAP tag when ``tagged``."""

    prefix: bytes
    tagged: bool = False


@dataclass(frozen=True)
class StartTls:
    """Run the server side of a TLS handshake with ``context``; later steps speak inside TLS."""

    context: ssl.SSLContext


@dataclass(frozen=True)
class Close:
    """Close the connection now."""


Step = Send | Expect | StartTls | Close

#: After the script: given a line the client sent, the bytes to answer (b"": none, keep listening), or None to
#: close the connection.
Responder = Callable[[bytes], bytes | None]


@dataclass
class Transcript:
    """What one connection did. ``cleartext`` is every byte received before a TLS handshake completed."""

    before_tls: bytearray = field(default_factory=bytearray)  # protocol bytes before the StartTls step
    handshake: bytearray = field(default_factory=bytearray)  # raw bytes while the handshake was running
    after_tls: bytearray = field(default_factory=bytearray)  # decrypted bytes after the handshake
    tls_established: bool = False
    tls_version: str | None = None
    tls_error: str = ""
    script_error: str = ""
    steps_done: int = 0
    completed: bool = False  # every step ran (the trailing phase may have followed)

    @property
    def cleartext(self) -> bytes:
        """Everything an eavesdropper saw in clear (before TLS and inside a handshake that never finished)."""
        handshake = b"" if self.tls_established else bytes(self.handshake)
        return bytes(self.before_tls) + handshake

    def cleartext_commands(self) -> list[bytes]:
        """The upper-cased command word of each clear-text line (IMAP: the word after the tag), including lines
        a failed handshake swallowed; binary TLS records are skipped."""
        lines = self.cleartext.split(b"\r\n")
        return [_command_word(line) for line in lines if line and _PRINTABLE.fullmatch(line)]

    def commands_after(self, command: bytes) -> list[bytes]:
        """The clear-text command words the client sent after ``command`` (AssertionError if it never did)."""
        words = self.cleartext_commands()
        assert command in words, f"the client never sent {command!r}: {words}"
        return words[words.index(command) + 1 :]


def _command_word(line: bytes) -> bytes:
    words = line.split()
    if not words:
        return b""
    first = words[0].upper()
    if first in AUTH_COMMANDS or len(words) == 1:
        return first
    return words[1].upper() if re.fullmatch(rb"[A-Za-z]+\d+", words[0]) else first


def secret_forms(secret: str) -> list[bytes]:
    """The secret as it may cross the wire: raw, and inside any base64 text at each of the 3 alignments."""
    raw = secret.encode()
    forms = [raw]
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw)
        start = -(-offset * 8 // 6)  # first character made only of secret bits
        end = (offset + len(raw)) * 8 // 6  # last character made only of secret bits
        forms.append(encoded[start:end])
    return forms


def cleartext_leaks(transcript: Transcript, secret: str) -> list[str]:
    """Why ``transcript`` shows a leak: the secret (raw or base64) or an authentication command in clear."""
    problems = []
    clear = transcript.cleartext
    for form in secret_forms(secret):
        if form in clear:
            problems.append(f"the secret crossed in clear as {form!r}")
    for word in transcript.cleartext_commands():
        if word in AUTH_COMMANDS:
            problems.append(f"the authentication command {word.decode()} arrived before TLS")
    return problems


def assert_no_leaks(server: FakeServer, secret: str) -> list[Transcript]:
    """Wait for ``server``; assert the client connected once (no fallback connection) and leaked nothing."""
    transcripts = server.wait()
    assert len(transcripts) == 1, f"the client connected {len(transcripts)} times (a fallback connection?)"
    for transcript in transcripts:
        assert cleartext_leaks(transcript, secret) == []
    return transcripts


class _Peer:
    """One client connection: line reading and sending, in clear or through an ``ssl.SSLObject``."""

    def __init__(self, sock: socket.socket, transcript: Transcript) -> None:
        self.sock = sock
        self.transcript = transcript
        self.buffer = b""
        self.tls: ssl.SSLObject | None = None
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()

    def _raw_recv(self, sink: bytearray) -> bytes:
        data = self.sock.recv(65536)
        sink += data
        return data

    def recv(self) -> bytes:
        if self.tls is None:
            return self._raw_recv(self.transcript.before_tls)
        while True:
            try:
                data = self.tls.read(65536)
            except ssl.SSLWantReadError:
                raw = self.sock.recv(65536)
                if not raw:
                    return b""
                self.incoming.write(raw)
                continue
            except ssl.SSLZeroReturnError:
                return b""
            self.transcript.after_tls += data
            return data

    def read_line(self) -> bytes:
        while b"\n" not in self.buffer:
            data = self.recv()
            if not data:
                raise EOFError("the client closed the connection")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.rstrip(b"\r")

    def send(self, data: bytes) -> None:
        if self.tls is None:
            self.sock.sendall(data)
            return
        self.tls.write(data)
        self._flush()

    def _flush(self) -> None:
        pending = self.outgoing.read()
        if pending:
            self.sock.sendall(pending)

    def start_tls(self, context: ssl.SSLContext) -> None:
        # bytes the client sent after the STARTTLS answer are part of the stream the handshake reads
        self.incoming.write(self.buffer)
        self.transcript.handshake += self.buffer
        self.buffer = b""
        tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                raw = self._raw_recv(self.transcript.handshake)
                if not raw:
                    raise EOFError("the client closed the connection during the handshake") from None
                self.incoming.write(raw)
            except ssl.SSLError:
                self._flush()  # the alert, so the client learns why
                raise
        self._flush()
        self.tls = tls
        self.transcript.tls_established = True
        self.transcript.tls_version = tls.version()

    def close(self) -> None:
        with contextlib.suppress(ssl.SSLError, OSError):
            if self.tls is not None:
                self.tls.unwrap()
                self._flush()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _substitute(data: bytes, tag: bytes) -> bytes:
    match = re.fullmatch(rb"([A-Za-z]*)(\d+)", tag)
    following = match.group(1) + str(int(match.group(2)) + 1).encode() if match else b"*"
    return data.replace(b"{tag}", tag or b"*").replace(b"{next_tag}", following)


class FakeServer:
    """Listens on 127.0.0.1 (free port); every connection plays ``steps``, then ``after_script`` (or closes).

    Use as a context manager; :meth:`wait` returns the transcripts once every connection has finished.
    """

    def __init__(
        self, steps: Sequence[Step] = (), *, after_script: Responder | None = None, timeout: float = 5.0
    ) -> None:
        self.steps = tuple(steps)
        self.after_script = after_script
        self.timeout = timeout
        self.host = LOOPBACK
        self.transcripts: list[Transcript] = []
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.02)
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept_loop, name=f"fake-server-{self.port}", daemon=True)

    @property
    def connections(self) -> int:
        return len(self.transcripts)

    @property
    def transcript(self) -> Transcript:
        """The first connection's transcript (raises AssertionError when nobody connected)."""
        assert self.transcripts, f"nobody connected to the fake server on port {self.port}"
        return self.transcripts[0]

    def __enter__(self) -> FakeServer:
        self._accepter.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._accepter.join(timeout=5)
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def wait(self, timeout: float = 5.0) -> list[Transcript]:
        """Wait until every connection so far has finished; AssertionError if one is still running."""
        deadline = time.monotonic() + timeout
        # a connection the kernel completed but the accept loop has not taken yet must be counted too
        while select.select([self._listener], [], [], 0)[0] and time.monotonic() < deadline:
            time.sleep(0.002)
        for thread in list(self._threads):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
            assert not thread.is_alive(), f"fake server on port {self.port} still busy after {timeout} s"
        return self.transcripts

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            transcript = Transcript()
            self.transcripts.append(transcript)
            self._sockets.append(conn)
            thread = threading.Thread(
                target=self._serve, args=(conn, transcript), name=f"fake-conn-{self.port}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, transcript: Transcript) -> None:
        conn.settimeout(self.timeout)
        peer = _Peer(conn, transcript)
        try:
            if self._play(peer, transcript):  # the script ran to its end without a Close
                self._trail(peer)
        except (EOFError, OSError, ssl.SSLError, ValueError):
            pass
        finally:
            peer.close()

    def _trail(self, peer: _Peer) -> None:
        if self.after_script is None:
            peer.read_line()  # record what the client says next, then hang up
            return
        while (answer := self.after_script(peer.read_line())) is not None:
            peer.send(answer)

    def _play(self, peer: _Peer, transcript: Transcript) -> bool:
        tag = b""
        for step in self.steps:
            try:
                if isinstance(step, Send):
                    if step.delay:
                        time.sleep(step.delay)
                    peer.send(_substitute(step.data, tag))
                elif isinstance(step, Expect):
                    line = peer.read_line()
                    rest = line
                    if step.tagged:
                        tag, _, rest = line.partition(b" ")
                    if not rest.upper().startswith(step.prefix.upper()):
                        transcript.script_error = f"expected {step.prefix!r}, the client sent {line!r}"
                        return False
                elif isinstance(step, StartTls):
                    try:
                        peer.start_tls(step.context)
                    except ssl.SSLError as exc:
                        transcript.tls_error = f"{exc.reason or exc}"
                        return False
                else:  # Close
                    transcript.steps_done += 1
                    transcript.completed = True
                    return False
            except (EOFError, OSError) as exc:
                transcript.script_error = f"step {transcript.steps_done + 1} ({step}): {exc}"
                if isinstance(step, StartTls):
                    transcript.tls_error = transcript.tls_error or str(exc)
                return False
            transcript.steps_done += 1
        transcript.completed = True
        return True
