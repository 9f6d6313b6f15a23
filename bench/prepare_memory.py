"""Peak memory of `keel prepare` on a folder whose main file is one 50 MB line of real text.

The long file is the standard library's source with every newline replaced by a space, files
in a shuffled order, repeated until it reaches the size (one line, one document). A few dozen
ordinary modules sit next to it so the corpus has a validation split. `keel prepare` runs in a
subprocess; its peak resident set size comes from getrusage(RUSAGE_CHILDREN).

    python bench/prepare_memory.py                 # 50 MB line, default vocab
    python bench/prepare_memory.py --mb 10 --vocab-size 2048
"""

from __future__ import annotations

import argparse
import random
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL_MODULES = 100
VAL_FRACTION = "0.1"  # of ~100 documents: enough for a validation split


def write_corpus(folder: Path, num_bytes: int) -> None:
    from keel.data.sources import python_stdlib_files

    files = python_stdlib_files()
    rng = random.Random(0)
    written = 0
    with open(folder / "one_line.txt", "w", encoding="utf-8") as out:
        while written < num_bytes:
            rng.shuffle(files)  # each round in another order, so no two rounds are the same text
            for path in files:
                text = path.read_text(encoding="utf-8", errors="replace").replace("\r", " ").replace("\n", " ") + " "
                out.write(text)
                written += len(text.encode("utf-8"))
                if written >= num_bytes:
                    break
    for path in files[:SMALL_MODULES]:
        (folder / f"module_{path.stem}.py").write_bytes(path.read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50, help="size of the one-line file in MB (default 50)")
    parser.add_argument("--vocab-size", type=int, default=None, help="passed to keel prepare (default: its own)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        write_corpus(corpus, int(args.mb * 1e6))
        command = [sys.executable, "-m", "keel.cli", "prepare", str(corpus), "--out", str(Path(tmp) / "data")]
        command += ["--val-fraction", VAL_FRACTION]
        command += ["--vocab-size", str(args.vocab_size)] if args.vocab_size else []
        line_bytes = (corpus / "one_line.txt").stat().st_size
        print(f"corpus: one line of {line_bytes / 1e6:.1f} MB + {SMALL_MODULES} modules")
        print(f"command: {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # kilobytes on Linux
        print(result.stdout.strip() or result.stderr.strip().splitlines()[-1])
        print(f"exit {result.returncode}, {seconds:.0f} s, peak RSS {peak_mb:,.0f} MB")
    try:
        from keel.data import MEMORY_BOUND
    except ImportError:
        MEMORY_BOUND = "(none stated)"
    print(f"bound: {MEMORY_BOUND}")


if __name__ == "__main__":
    main()
