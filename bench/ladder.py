"""The repair ladder: too-high learning rates it must repair, healthy runs it must leave alone.

Three tables, every run trained in this process by `keel.train.loop.train`, one after the other:

- high lr: the tiny model at 1x, 10x and 20x its good learning rate, without and with the
  supervisor: validation loss at the end, the repairs taken, whether the supervisor stopped it;
- false positives: healthy runs, the good learning rate up to 3x it, over several seeds, on the
  tiny model and on the default one, all supervised. Any repair here (rung 2 and up: rollback, lr
  cut, optimizer reset, stop) is a false positive. Skipped updates (rung 1) are counted apart:
  a lone grad-norm outlier is skipped by design and never escalates;
- growth: what the norm-growth test sees in unsupervised tiny runs from 1x to 20x the good lr:
  how far the last-block activation RMS grew, and the least the loss average fell over any
  stretch in which that RMS grew `supervisor.norm_stall_growth` times (the test fires under
  `supervisor.norm_min_progress`).

The tiny model is the tests' TINY config 128 wide, trained 300 steps on a small stdlib corpus
(the tests' modules, BPE 512), as in issue #13. The default model is keel's default recipe (shape, lr, batch,
dtype) on the whole stdlib (BPE 8192), 300 steps so that a run takes minutes on two cores.

    python bench/ladder.py                                       # both tables (~1 h on 2 shared cores)
    python bench/ladder.py --only high_lr
    python bench/ladder.py --only growth
    python bench/ladder.py --only false_positives --models tiny --seeds 1 2 3
    python bench/ladder.py --data /tmp/ladder-data               # reuse a prepared builtin:python-stdlib
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from keel import config as config_lib
from keel.data import prepare
from keel.runs.registry import Registry
from keel.runs.rundir import LOGBOOK_FILE, init_run_dir
from keel.supervisor.logbook import read_logbook
from keel.supervisor.monitors import Ewm
from keel.train.loop import train
from keel.train.precision import describe_cpu

CACHE = Path(__file__).parent / ".cache"
TINY_DATA = CACHE / "stdlib-small-512"
STDLIB_DATA = CACHE / "python-stdlib-8192"
# The corpus of tests/conftest.py (tiny_data), so the tiny figures are those of the test config.
CORPUS_MODULES = [
    "argparse.py",
    "textwrap.py",
    "string.py",
    "shlex.py",
    "csv.py",
    "difflib.py",
    "json/decoder.py",
    "json/encoder.py",
    "calendar.py",
    "fractions.py",
    "heapq.py",
    "bisect.py",
    "queue.py",
    "pprint.py",
    "glob.py",
    "fnmatch.py",
    "tokenize.py",
    "ast.py",
    "dataclasses.py",
    "enum.py",
    "functools.py",
    "contextlib.py",
    "abc.py",
    "operator.py",
    "copy.py",
    "shutil.py",
    "tempfile.py",
    "configparser.py",
]
MODELS = {
    # tests/conftest.py's TINY, 128 wide and 300 steps; 20 validation batches rather than 2, for a steadier figure
    "tiny": (
        3e-3,
        [
            "model.n_layer=2",
            "model.d_model=128",
            "model.n_head=4",
            "model.n_kv_head=2",
            "model.context_length=64",
            "train.batch_size=4",
            "train.max_steps=300",
            "train.eval_every=300",
            "train.eval_batches=20",
            "train.checkpoint_every=10",
            "train.dtype=float32",
            "optim.warmup_steps=5",
        ],
    ),
    # keel's default model, optimizer and batch, in the dtype train.dtype=auto picks on this CPU;
    # 400 steps keep a run to minutes and are long enough for the rate check (at step 80: 4x that)
    "default": (
        config_lib.load(None, []).optim.lr,
        ["train.max_steps=400", "train.eval_every=400", "train.checkpoint_every=25"],
    ),
}
REPAIRS = ("rollback", "scale_lr", "reset_optimizer", "rate_check", "stop")  # set_clip comes with scale_lr


@dataclass
class Outcome:
    model: str
    multiple: float
    lr: float
    seed: int
    supervised: bool
    val_loss: float
    status: str
    skips: int
    repairs: list[str]  # the actions of rungs 2-5, in order
    signals: list[str]  # the state signals (divergence, act_growth, ...) logged, and unconfirmed divergences
    lr_multiplier: float  # where the supervisor's cuts left the learning rate
    seconds: float
    act_norm: list[float]  # per step applied, as the supervisor saw them
    loss: list[float]


def prepare_tiny_data() -> Path:
    if not (TINY_DATA / "manifest.json").exists():
        print(f"preparing {TINY_DATA} (once) ...", flush=True)
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        with tempfile.TemporaryDirectory() as tmp:
            for name in CORPUS_MODULES:
                shutil.copyfile(stdlib / name, Path(tmp) / name.replace("/", "_"))
            prepare([tmp], TINY_DATA, vocab_size=512, val_fraction=0.1, progress=False)
    return TINY_DATA


def prepare_stdlib_data(path: Path | None) -> Path:
    if path is not None:
        return path
    if not (STDLIB_DATA / "manifest.json").exists():
        print(f"preparing {STDLIB_DATA} (once) ...", flush=True)
        prepare(["builtin:python-stdlib"], STDLIB_DATA, vocab_size=8192, progress=False)
    return STDLIB_DATA


def run(model: str, data: Path, multiple: float, seed: int, supervised: bool) -> Outcome:
    good_lr, sets = MODELS[model]
    lr = good_lr * multiple
    config = config_lib.load(
        None,
        [
            f"data.path={data}",
            "name=ladder",
            "train.compile=false",
            f"train.seed={seed}",
            f"optim.lr={lr}",
            f"supervisor.enabled={str(supervised).lower()}",
            *sets,
        ],
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        config = init_run_dir(config, run_dir)
        with Registry(Path(tmp) / "registry.sqlite") as registry:
            result = train(config, run_dir, registry=registry, progress=False)
            series = registry.metrics(config.name)
        entries = read_logbook(run_dir / LOGBOOK_FILE)
    actions = [e for e in entries if e["kind"] == "action"]
    cuts = [e["evidence"]["lr_multiplier"] for e in actions if e["name"] == "scale_lr"]
    return Outcome(
        model=model,
        multiple=multiple,
        lr=lr,
        seed=seed,
        supervised=supervised,
        val_loss=result.val_loss if result.val_loss is not None else float("nan"),
        status=result.status,
        skips=sum(e["name"] == "skip_update" for e in actions),
        repairs=[e["name"] for e in actions if e["name"] in REPAIRS],
        signals=[
            e["name"]
            for e in entries
            if e["kind"] == "signal"
            and e["name"] not in ("loss_spike", "grad_spike")
            or e["name"] == "divergence_unconfirmed"
        ],
        lr_multiplier=cuts[-1] if cuts else 1.0,
        seconds=time.perf_counter() - start,
        act_norm=[v for _, v in series.get("act_norm", [])],
        loss=[v for _, v in series.get("loss", [])],
    )


def least_progress(outcome: Outcome, growth: float, span: int) -> tuple[float, int, int]:
    """(progress, first step, last step) of the stretch where the activation RMS average grew `growth`x
    while the loss average fell least, both `span`-step EWMs as NormGrowthMonitor keeps them."""
    norm_ewm, loss_ewm, norms, losses = Ewm(span), Ewm(span), [], []
    for norm, loss in zip(outcome.act_norm, outcome.loss):
        norm_ewm.add(norm)
        loss_ewm.add(loss)
        norms.append(norm_ewm.mean)
        losses.append(loss_ewm.mean)
    worst = (float("inf"), -1, -1)
    for last in range(len(norms)):
        firsts = [first for first in range(last) if norms[last] >= growth * norms[first]]
        if firsts:
            first = firsts[-1]  # the shortest stretch, as the monitor tests
            worst = min(worst, (1 - losses[last] / losses[first], first, last))
    return worst


def describe_repairs(outcome: Outcome) -> str:
    if not outcome.supervised:
        return "-"
    names = outcome.repairs
    counted = ", ".join(f"{names.count(n)} {n}" for n in dict.fromkeys(names)) or "none"
    if outcome.lr_multiplier != 1.0:
        counted += f" (lr ×{outcome.lr_multiplier:g})"
    return counted


def print_table(title: str, outcomes: list[Outcome], good: dict[str, float] | None = None) -> None:
    print(f"\n{title}")
    header = (
        f"{'model':<8} {'lr':>4} {'lr value':>9} {'seed':>5} {'supervised':>10} {'val loss':>8} "
        f"{'vs 1x':>6} {'skips':>5} {'stopped':>7}  repairs (state signals)"
    )
    print(header + "\n" + "-" * len(header))
    for o in outcomes:
        reference = (good or {}).get(f"{o.model}/{o.seed}")
        versus = f"{o.val_loss / reference - 1:+.1%}" if reference else ""
        signals = f" ({', '.join(dict.fromkeys(o.signals))})" if o.signals else ""
        print(
            f"{o.model:<8} {o.multiple:>3g}x {o.lr:>9.3g} {o.seed:>5} {'yes' if o.supervised else 'no':>10} "
            f"{o.val_loss:8.3f} {versus:>6} {o.skips if o.supervised else '-':>5} "
            f"{'yes' if o.status.startswith('stopped') else 'no':>7}  {describe_repairs(o)}{signals}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=("high_lr", "false_positives", "growth"), help="one table only")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="false positives on")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="seeds of the false-positive runs")
    parser.add_argument(
        "--multiples", nargs="+", type=float, default=[1, 2, 3], help="lr multiples of the false-positive runs"
    )
    parser.add_argument(
        "--high-lr-seeds", nargs="+", type=int, default=[1], help="seeds of the 1x/10x/20x runs (default: 1)"
    )
    parser.add_argument("--data", type=Path, help="prepared builtin:python-stdlib data for the default model")
    args = parser.parse_args()

    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    here = Path(__file__).parent
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here)
    print(f"commit: {commit.stdout.strip() or 'unknown'}")
    print("cpu:", describe_cpu())
    print(f"machine: {os.cpu_count()} cores, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    tiny_data = prepare_tiny_data()

    if args.only in (None, "high_lr"):
        outcomes = []
        for seed in args.high_lr_seeds:
            for multiple in (1, 10, 20):
                for supervised in (False, True):
                    outcomes.append(run("tiny", tiny_data, multiple, seed, supervised))
        good = {f"tiny/{o.seed}": o.val_loss for o in outcomes if o.multiple == 1 and o.supervised}
        print_table("high lr: the tiny model at 1x, 10x and 20x its good lr (3e-3)", outcomes, good)

    if args.only in (None, "growth"):
        defaults = config_lib.load(None, []).supervisor
        growth, span = defaults.norm_stall_growth, defaults.norm_fast_span
        print(
            f"\ngrowth: the tiny model without the supervisor; least loss progress over a {growth:g}x growth "
            f"of the activation RMS (the test fires under {defaults.norm_min_progress:.0%})"
        )
        header = f"{'lr':>4} {'val loss':>8} {'act RMS first':>13} {'last':>9} {'grew':>8}  least progress (steps)"
        print(header + "\n" + "-" * len(header))
        for multiple in (1, 2, 3, 5, 7, 10, 20):
            o = run("tiny", tiny_data, multiple, args.high_lr_seeds[0], supervised=False)
            progress, first, last = least_progress(o, growth, span)
            stretch = f"{progress:+.1%} ({first}-{last})" if first >= 0 else f"never grew {growth:g}x"
            print(
                f"{multiple:>3g}x {o.val_loss:8.3f} {o.act_norm[0]:13.3g} {o.act_norm[-1]:9.3g} "
                f"{o.act_norm[-1] / o.act_norm[0]:7.0f}x  {stretch}",
                flush=True,
            )

    if args.only in (None, "false_positives"):
        data = {"tiny": tiny_data}
        if "default" in args.models:
            data["default"] = prepare_stdlib_data(args.data)
        outcomes = []
        for model in args.models:
            for multiple in args.multiples:
                for seed in args.seeds:
                    outcomes.append(run(model, data[model], multiple, seed, supervised=True))
        good = {f"{o.model}/{o.seed}": o.val_loss for o in outcomes if o.multiple == 1}
        print_table("false positives: healthy runs, supervised (any repair is a false positive)", outcomes, good)
        false_positives = [o for o in outcomes if o.repairs]
        print(f"\n{len(false_positives)} of {len(outcomes)} healthy runs took a repair")


if __name__ == "__main__":
    main()
