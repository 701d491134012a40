"""How quickly ``postbridge demo --once`` shows results, against the start-up of ``postbridge --version`` measured in
the same run; writes the "Demo" part of ``docs/performance.md``.

The issue asks for first results within 30 s on a fresh machine after installation; this measures, over a few
runs: the first line on screen, when each step passed, and the exit (which includes stopping everything). The
baseline is the interpreter plus postbridge's import (``postbridge --version``), the floor of any command.

    .venv/bin/python bench/demo.py                      # print the figures
    .venv/bin/python bench/demo.py --out docs/performance.md

Bounded: at most ``--runs`` demo runs (default 3), each killed after 120 s. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, Python puts bench/ first on the path (where bench/profile.py hides the standard library's
# `profile`): import from the repository root instead, as the other benchmarks do.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mail_report import machine  # noqa: E402
from bench.sections import replace_section  # noqa: E402

BEGIN = "<!-- bench/demo.py results: begin (generated, replaced on every run) -->"
END = "<!-- bench/demo.py results: end -->"
TIME_LIMIT = 120.0
SKELETON = f"""
## Demo start-up

`bench/demo.py` runs `postbridge demo --once` a few times and records when the first line appears, when each step
passed and when the process exits, against `postbridge --version` (interpreter and imports) in the same run.

```sh
.venv/bin/python bench/demo.py --out docs/performance.md
```

{BEGIN}
{END}
"""
STEP = re.compile(rb"step (\d+) (passed|FAILED) in")


@dataclass
class DemoRun:
    first_line: float = 0.0
    steps: dict[int, float] = field(default_factory=dict)  # step -> seconds since start when it ended
    exit_after: float = 0.0
    code: int | None = None


def baseline() -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "postbridge", "--version"], check=True, capture_output=True, timeout=60)
    return time.monotonic() - started


def one_run() -> DemoRun:
    run = DemoRun()
    env = {**os.environ, "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "postbridge", "demo", "--once"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    assert process.stdout is not None
    try:
        for line in process.stdout:
            now = time.monotonic() - started
            if not run.first_line:
                run.first_line = now
            match = STEP.search(line)
            if match:
                run.steps[int(match.group(1))] = now
            if now > TIME_LIMIT:
                break
        run.code = process.wait(timeout=max(1.0, TIME_LIMIT - (time.monotonic() - started)))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    run.exit_after = time.monotonic() - started
    return run


def render(runs: list[DemoRun], base: float) -> str:
    def median(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} s" if values else "-"

    steps = sorted({step for run in runs for step in run.steps})
    lines = [
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {len(runs)} runs, medians; baseline `postbridge --version` "
        f"{base:.2f} s.",
        "",
        *machine([]),
        "",
        "| moment | seconds after start | × baseline |",
        "|---|---|---|",
        f"| first line on screen | {median([r.first_line for r in runs])} "
        f"| {statistics.median([r.first_line for r in runs]) / base:.1f} |",
    ]
    for step in steps:
        values = [run.steps[step] for run in runs if step in run.steps]
        lines.append(f"| step {step} done | {median(values)} | {statistics.median(values) / base:.1f} |")
    exits = [run.exit_after for run in runs]
    lines.append(f"| exit (everything stopped) | {median(exits)} | {statistics.median(exits) / base:.1f} |")
    codes = sorted({str(run.code) for run in runs})
    lines += [
        "",
        f"Exit codes: {', '.join(codes)}. Between the last step and the exit everything stops: the connector drains "
        "its tunnel (a stream lingering for a TLS backend ends at once, decisions.md 31), then the hub and the lab.",
    ]
    return "\n".join(lines) + "\n"


def write(path: Path, section: str) -> None:
    replace_section(path, section, begin=BEGIN, end=END, new_page="# Performance\n", appended="\n" + SKELETON)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="demo runs (1-10)")
    parser.add_argument("--out", type=Path, help="update the Demo part of this Markdown file")
    args = parser.parse_args()
    count = min(10, max(1, args.runs))
    base = statistics.median(baseline() for _ in range(3))
    runs = [one_run() for _ in range(count)]
    section = render(runs, base)
    print(section)
    if args.out:
        write(args.out, section)
    return 0 if all(run.code == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
