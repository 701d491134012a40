"""Sampling profiles of running processes with py-spy, summarised as the top frames (for docs/performance.md).

Owns: finding py-spy (PATH, ``$PY_SPY``, or ``/tmp/py-spy/bin/py-spy`` from ``pip install --target /tmp/py-spy
py-spy``; it is not a project dependency), recording several processes at once in the background while the caller
runs a workload, and turning py-spy's "raw" (collapsed stack) output into a Markdown table of the frames that use
the most CPU, by own time and by time including callees. Must not: install anything.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

RATE = 250  # samples per second
_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def find_py_spy() -> str | None:
    for candidate in (os.environ.get("PY_SPY", ""), "/tmp/py-spy/bin/py-spy", shutil.which("py-spy") or ""):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class Recorder:
    """``py-spy record`` on each pid for ``seconds``; :meth:`summary` waits for them and summarises."""

    def __init__(self, py_spy: str, pids: dict[str, int], seconds: float, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.seconds = seconds
        self.outputs = {name: folder / f"{name}.raw" for name in pids}
        self.processes = {
            name: subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(max(1, round(seconds))),
                    "--rate",
                    str(RATE),
                    "--nonblocking",
                    "--format",
                    "raw",
                    "--output",
                    str(self.outputs[name]),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=(folder / f"{name}.log").open("ab"),
            )
            for name, pid in pids.items()
        }

    def summary(self, top: int = 8) -> str:
        parts = []
        for name, process in self.processes.items():
            try:
                process.wait(self.seconds + 30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
            path = self.outputs[name]
            if not path.exists():
                parts.append(f"{name}: py-spy wrote no profile (see {path.with_suffix('.log')})\n")
                continue
            parts.append(summarise(name, path.read_text(), self.seconds, top))
        return "\n".join(parts)


def _short(frame: str) -> str:
    found = _FRAME.match(frame)
    if not found:
        return frame
    path = found.group("file")
    for marker in ("site-packages/", "src/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{found.group('function')} ({path})"


def summarise(name: str, raw: str, seconds: float, top: int) -> str:
    """A Markdown table of the top frames of one process from py-spy's raw output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        found = _LINE.match(line.strip())
        if not found:
            continue
        count = int(found.group("count"))
        frames = [_short(f) for f in found.group("stack").split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return f"{name}: no samples (the process was idle)\n"
    busy = total / (seconds * RATE) * 100
    lines = [
        f"**{name}**: {total} samples while busy ≈ {busy:.0f}% of one core over {seconds:.0f} s.",
        "",
        "| own time | frame | | incl. time | frame |",
        "|---:|---|---|---:|---|",
    ]
    # frames on (nearly) every stack are the event loop and the command line: they say nothing
    broad = [(f, c) for f, c in inclusive.most_common() if c < 0.9 * total]
    for (f_own, c_own), (f_inc, c_inc) in zip(own.most_common(top), broad[:top], strict=False):
        lines.append(f"| {c_own / total:.0%} | `{f_own}` | | {c_inc / total:.0%} | `{f_inc}` |")
    return "\n".join(lines) + "\n"
