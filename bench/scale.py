"""A scaling ladder that predicts and is checked: `keel scale` on the venv's own Python source.

Trains a ladder of four model sizes (depth 1-4: n_layer d, d_model 32d, n_head d) at three compute
budgets (1.5e12, 3e12, 6e12 FLOPs), each an ordinary supervised keel run, fits L(N, D) by
Chinchilla's approaches 3 and 2, predicts the val loss of the compute-optimal run at 4x the largest
budget (2.4e13 FLOPs) before training it, then trains it and prints the prediction's error (the
goal: within 2%). Prints the ladder's cost (wall time, FLOPs), both fits with N = non-embedding and
N = all parameters, and the prediction; everything is also in LADDER_DIR/ladder.json and ladder.png.

The corpus is the site-packages directory of the interpreter running this script (the venv's
installed packages, tens of millions of tokens once prepared with `keel prepare DIR`): the stdlib's
~3M tokens are too few for a ladder that must not repeat data (keel scale refuses such a ladder).
It is prepared once into bench/.cache/ (minutes), and the ladder lives in bench/.cache/ too, so a
second invocation resumes an interrupted ladder and re-prints a finished one without training.

    OMP_NUM_THREADS=2 PYTHONPATH=src python bench/scale.py     # ~1 h on 2 idle cores, after the corpus
    PYTHONPATH=src python bench/scale.py --smoke               # the same code, tiny budgets, small corpus (~3 min)
    PYTHONPATH=src python bench/scale.py --data DATA_DIR --out LADDER_DIR

Run it on an idle machine: the runs share its cores, and a busy machine slows the ladder, not its
figures (a ladder's budget is FLOPs, not time).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import sysconfig
import time
from pathlib import Path

from keel.data import open_data, prepare
from keel.research import scale as scale_lib
from keel.train.precision import describe_cpu

CACHE = Path(__file__).parent / ".cache"
# Every run shares these (keel scale refuses a ladder whose runs differ in anything but size and budget).
# The final evaluation alone scores a run: 100 batches of 16 x 128 tokens, the same windows for every run.
BASE = [
    "model.context_length=128",
    "train.batch_size=16",
    "train.eval_every=1000000",
    "train.eval_batches=100",
    "train.checkpoint_every=500",
    "train.dtype=float32",
    # Compiling costs tens of seconds per run and shape on a small CPU; most of these runs are shorter than that pays.
    "train.compile=false",
    "optim.lr=2e-3",
]
FULL = {"depths": [1, 2, 3, 4], "budgets": [1.5e12, 3e12, 6e12], "aspect": 32, "vocab": 2048, "predict": 2.4e13}
SMOKE = {"depths": [1, 2, 3], "budgets": [2e9, 4e9], "aspect": 32, "vocab": 512, "predict": 1.6e10}
SMOKE_BASE = [
    "model.context_length=64",
    "train.batch_size=4",
    "train.eval_every=1000000",
    "train.eval_batches=10",
    "train.dtype=float32",
    "train.compile=false",
    "optim.lr=3e-3",
]


def ensure_data(smoke: bool) -> Path:
    """The bench's corpus, prepared once: site-packages (full) or three stdlib packages (smoke)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if smoke:
        sources, out = [stdlib / "email", stdlib / "json", stdlib / "importlib"], CACHE / "scale-smoke-512"
    else:
        sources, out = (
            [Path(sysconfig.get_paths()["purelib"])],
            CACHE / f"site-packages-{FULL['vocab']}",
        )
    if not (out / "manifest.json").is_file():
        vocab = SMOKE["vocab"] if smoke else FULL["vocab"]
        print(f"preparing {out} from {', '.join(map(str, sources))} (once) ...", flush=True)
        started = time.perf_counter()
        # Only the .py files: site-packages also holds data files (pyarrow's .parquet test fixtures) that are
        # not text datasets.
        val_fraction = 0.01 if not smoke else 0.1
        prepare([str(s) for s in sources], out, vocab_size=vocab, val_fraction=val_fraction, include=["*.py"])
        print(f"prepared in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny budgets on three stdlib packages, minutes")
    parser.add_argument("--data", type=Path, help="a prepared corpus (default: site-packages, prepared once)")
    parser.add_argument("--out", type=Path, help="the ladder directory (default bench/.cache/scale-ladder[-smoke])")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits behind the intervals")
    args = parser.parse_args()
    plan, base = (SMOKE, SMOKE_BASE) if args.smoke else (FULL, BASE)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"cpu: {describe_cpu()}")
    data = args.data or ensure_data(args.smoke)
    manifest = open_data(data).manifest
    print(
        f"corpus: {data}: {manifest['splits']['train']['tokens']:,} training tokens, "
        f"vocabulary {manifest['tokenizer']['vocab_size']}"
    )
    out = args.out or CACHE / ("scale-ladder-smoke" if args.smoke else "scale-ladder")
    started = time.perf_counter()
    code = scale_lib.scale(
        out,
        plan["depths"],
        plan["budgets"],
        plan["aspect"],
        None,
        [f"data.path={data}", *base],
        plan["predict"],
        args.bootstrap,
    )
    minutes = (time.perf_counter() - started) / 60
    ladder = scale_lib.open_ladder(out)
    rungs = ladder.record["rungs"].values()
    prediction = next(p for p in ladder.record["predictions"] if p["budget"] == plan["predict"])
    print()
    print(f"summary ({'smoke: tiny budgets, figures meaningless' if args.smoke else 'the measured ladder'}):")
    print(
        f"  ladder: {len(rungs)} runs, {sum(r['flops'] for r in rungs):.3g} training FLOPs, "
        f"{sum(r['seconds'] for r in rungs) / 60:.1f} min of run wall time"
    )
    print(
        f"  prediction run: {prediction['flops']:.3g} FLOPs ({prediction['ratio']:.3g}x the largest budget), "
        f"{prediction['seconds'] / 60:.1f} min; this invocation: {minutes:.1f} min"
    )
    for kind, predicted in prediction["predicted"].items():
        error = prediction["relative_error"][kind] if prediction["relative_error"] else None
        verdict = (
            "" if error is None else f", error {100 * error:+.2f}% ({'within' if abs(error) <= 0.02 else 'outside'} 2%)"
        )
        print(
            f"  N = {scale_lib.N_KIND_NAMES[kind]}: predicted {predicted['loss']:.4f}, measured "
            f"{prediction['measured'] if prediction['measured'] is not None else float('nan'):.4f}{verdict}"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
