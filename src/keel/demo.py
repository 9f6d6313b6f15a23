"""`keel demo`: the whole pipeline on the Python standard library in a bounded time."""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from keel import config as config_lib
from keel.data import open_data, prepare
from keel.errors import UserError
from keel.inference import evaluate_run, load_run, sample
from keel.runs.rundir import init_run_dir
from keel.train.launch import launch
from keel.train.loop import COMPILE_MIN_STEPS, TimedTrainer, should_compile
from keel.train.precision import pick_device

PROMPTS = ["import os\n\n\ndef ", "class Parser:\n    def __init__(self", "    for i in range("]


def ensure_data(data_dir: Path, vocab_size: int = 8192) -> None:
    """Prepare builtin:python-stdlib once; later demos reuse it."""
    if (data_dir / "manifest.json").is_file():
        print(f"using prepared data in {data_dir}")
        return
    print("preparing builtin:python-stdlib (the standard library's own source) ...")
    manifest = prepare(["builtin:python-stdlib"], data_dir, vocab_size=vocab_size)
    splits = manifest["splits"]
    print(f"prepared {splits['train']['documents']} train / {splits['val']['documents']} val documents, "
          f"{splits['train']['tokens']:,} / {splits['val']['tokens']:,} tokens in {data_dir}")


# The first steps of a process are slow (allocation, and compilation when it is on): not timed.
WARMUP_STEPS = 3
# Timed steps after them: the median of their five whole-step intervals ignores a step that
# something else on the machine slowed down.
TIMED_STEPS = 6
# Share of the budget planned for training steps. The rest goes to evaluations, checkpoints,
# start-up (reading the compile cache) and a machine that runs slower than while it was timed:
# at 0.9, an 8-minute demo hit its time limit at step 1021 of 1120, before the lr decay ended.
STEP_SHARE = 0.8


def _seconds_per_step(config: config_lib.RunConfig, compiled: bool) -> float:
    probe = dataclasses.replace(config, name="demo-calibration", train=dataclasses.replace(
        config.train, max_steps=WARMUP_STEPS + TIMED_STEPS, eval_every=10_000, checkpoint_every=10_000,
        compile=compiled))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = TimedTrainer(init_run_dir(probe, Path(tmp)), Path(tmp), registry=None, progress=False,
                               warmup=WARMUP_STEPS)
        trainer.run()
    # Whole iterations between step starts: never the probe's closing evaluation.
    return statistics.median(trainer.step_seconds())


def steps_for_budget(config: config_lib.RunConfig, minutes: float) -> int:
    """Time a few real training steps and size the run (and so its lr schedule) to the budget.

    The probe runs the way the real run will: compiled when train.compile=auto will compile a run
    of the resulting length (its compilation also warms the cache the real run then reads).
    """
    def fit(compiled: bool) -> int:
        return max(20, int(STEP_SHARE * 60 * minutes / _seconds_per_step(config, compiled)))

    def compiles(max_steps: int) -> bool:
        return should_compile(dataclasses.replace(config.train, max_steps=max_steps), 0, pick_device(config.train.device))

    compiled = compiles(COMPILE_MIN_STEPS)  # first guess: the run will be long enough
    steps = fit(compiled)
    if compiled and not compiles(steps):
        steps = fit(compiled=False)  # too short a run to compile after all
    return steps


def run_demo(minutes: float, data_dir: Path = Path("data/python-stdlib"), runs_dir: Path = Path("runs")) -> Path:
    if minutes <= 0:
        raise UserError(f"--minutes must be positive, got {minutes}.")
    ensure_data(data_dir)
    open_data(data_dir)
    base = config_lib.load(None, [f"data.path={data_dir}"])
    max_steps = steps_for_budget(base, minutes)
    name = time.strftime("demo-%Y%m%d-%H%M%S")
    config = config_lib.load(None, [
        f"name={name}", f"data.path={data_dir}", f"train.max_steps={max_steps}",
        f"train.max_minutes={minutes}", f"train.eval_every={max(50, max_steps // 8)}",
        f"train.checkpoint_every={max(50, max_steps // 8)}",
    ])
    run_dir = runs_dir / name
    print(f"training {name} for {max_steps} steps (about {minutes:g} minutes) in {run_dir}")
    code = launch(config, run_dir)
    if code != 0:
        raise UserError(f"training stopped with exit code {code}; see `keel logbook {run_dir}`.")
    run = load_run(run_dir)
    for prompt in PROMPTS:
        print(f"\n----- sample (prompt {prompt!r}) -----")
        print(sample(run, prompt, max_new_tokens=160, temperature=0.8, top_k=50))
    result = evaluate_run(run)
    print(f"\nval loss {result.loss:.3f}  perplexity {result.perplexity:.1f}  "
          f"bits/byte {result.bits_per_byte:.3f}  ({result.tokens:,} held-out tokens)")
    print(f"\nthe run lives in {run_dir}: keel sample {run_dir} --prompt 'def '; keel eval {run_dir}; keel runs")
    return run_dir
