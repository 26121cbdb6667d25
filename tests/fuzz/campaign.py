"""The long fuzzing campaign behind ``scripts/fuzz`` (not run in CI).

For each target: a coverage-guided atheris run of ``--explore`` inputs grows a corpus from
the seeds, then ``--runs`` more inputs mutate that corpus with coverage off, for volume.
Each run is a child process (``tests.fuzz.atheris_main``) under ``nice``; its log, corpus and
any crash input stay in ``--dir``. The result is a Markdown table (inputs, exec/s, crashes)
for docs/fuzzing.md; the exit status is 1 when any target crashed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.fuzz.targets import TARGETS

REPO = Path(__file__).resolve().parents[2]
_DONE = re.compile(rb"^Done (\d+) runs in (\d+) second", re.MULTILINE)


@dataclass
class Phase:
    runs: int = 0
    seconds: float = 0.0
    crashed: bool = False


def run_phase(target: str, workdir: Path, runs: int, max_len: int, coverage: bool) -> Phase:
    """One atheris run; its log is ``<target>.<phase>.log`` in ``workdir``."""
    label = "explore" if coverage else "volume"
    command = ["nice", "-n", "10", sys.executable, "-m", "tests.fuzz.atheris_main",
               *([] if coverage else ["--no-coverage"]), target, f"-runs={runs}",
               f"-max_len={max_len}", "-timeout=30", "-rss_limit_mb=4096", "-print_final_stats=1",
               f"-artifact_prefix={workdir / 'crashes' / target}-",
               *([] if coverage else ["-keep_seed=1"]), str(workdir / "corpus" / target)]
    (workdir / "crashes").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, capture_output=True)
    elapsed = time.monotonic() - started
    log = result.stdout + result.stderr
    (workdir / f"{target}.{label}.log").write_bytes(log)
    done = _DONE.search(log)
    return Phase(runs=int(done.group(1)) if done else 0, seconds=elapsed,
                 crashed=result.returncode != 0)


def run_target(target: str, args: argparse.Namespace) -> tuple[str, Phase, Phase]:
    explore = run_phase(target, args.dir, args.explore, args.max_len, coverage=True)
    volume = (Phase() if explore.crashed
              else run_phase(target, args.dir, args.runs, args.max_len, coverage=False))
    line = (f"{target}: {explore.runs + volume.runs} inputs, "
            f"{'CRASH' if explore.crashed or volume.crashed else 'no crash'}")
    print(line, flush=True)
    return target, explore, volume


def table(results: list[tuple[str, Phase, Phase]]) -> str:
    rows = ["| target | inputs | coverage-guided exec/s | volume exec/s | crashes |",
            "|---|---:|---:|---:|---:|"]
    for target, explore, volume in results:
        rate = [f"{phase.runs / phase.seconds:,.0f}" if phase.seconds else "–"
                for phase in (explore, volume)]
        crashes = int(explore.crashed) + int(volume.crashed)
        rows.append(f"| {target} | {explore.runs + volume.runs:,} | {rate[0]} | {rate[1]} "
                    f"| {crashes} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help=f"default: all ({', '.join(TARGETS)})")
    parser.add_argument("--runs", type=int, default=1_000_000,
                        help="inputs per target after the coverage-guided run")
    parser.add_argument("--explore", type=int, default=100_000,
                        help="coverage-guided inputs per target")
    parser.add_argument("--jobs", type=int, default=1, help="targets fuzzed at once")
    parser.add_argument("--max-len", type=int, default=1024, help="longest input")
    parser.add_argument("--dir", type=Path,
                        default=Path(os.environ.get("TMPDIR", "/tmp")) / "stalroute-fuzz",
                        help="corpora, logs and crash inputs")
    args = parser.parse_args()
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets: {', '.join(unknown)}")
    args.dir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda name: run_target(name, args), args.targets or TARGETS))
    report = (f"Campaign of {started:%Y-%m-%d} ({started:%H:%M} UTC), -max_len={args.max_len}, "
              f"logs in {args.dir}:\n\n{table(results)}\n")
    (args.dir / "report.md").write_text(report)
    print("\n" + report)
    return 1 if any(explore.crashed or volume.crashed for _, explore, volume in results) else 0


if __name__ == "__main__":
    sys.exit(main())
