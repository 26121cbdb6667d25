"""Run one fuzz target under atheris (libFuzzer):
``python -m tests.fuzz.atheris_main [--no-coverage] TARGET [libFuzzer options] [CORPUS_DIR]``
(``scripts/fuzz`` runs every target this way), or replay inputs:
``python -m tests.fuzz.atheris_main TARGET FILE...``.

By default stalroute's modules are instrumented, so libFuzzer's mutations follow the
parsers' branches and grow the corpus. ``--no-coverage`` leaves them as they are (about five
times faster): libFuzzer then only mutates the corpus it is given, for volume after a
coverage-guided run has built that corpus. A target that raises is a crash: libFuzzer prints
the traceback, saves the input (``-artifact_prefix``) and exits non-zero.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import atheris


def main() -> None:
    coverage = "--no-coverage" not in sys.argv
    argv = [arg for arg in sys.argv if arg != "--no-coverage"]
    instrument = (atheris.instrument_imports(include=["stalroute"]) if coverage
                  else contextlib.nullcontext())
    with instrument:
        from tests.fuzz.targets import SEEDS, TARGETS
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} [--no-coverage] TARGET [libFuzzer options] [CORPUS]\n"
                 f"targets: {' '.join(TARGETS)}")
    name = argv.pop(1)
    corpora = [Path(arg) for arg in argv[1:] if not arg.startswith("-")]
    for corpus in corpora[:1]:
        if corpus.is_file():  # an input to replay, not a corpus
            break
        corpus.mkdir(parents=True, exist_ok=True)
        if not any(corpus.iterdir()):
            for index, seed in enumerate(SEEDS.get(name, ())):
                (corpus / f"seed-{index}").write_bytes(seed)
    atheris.Setup(argv, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
