"""`keel demo`: the whole pipeline on the Python standard library in a bounded time."""

from __future__ import annotations

import time
from pathlib import Path

from keel import config as config_lib
from keel.data import open_data, prepare
from keel.errors import UserError
from keel.inference import evaluate_run, load_run, sample
from keel.train.launch import launch

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


def run_demo(minutes: float, data_dir: Path = Path("data/python-stdlib"), runs_dir: Path = Path("runs")) -> Path:
    if minutes <= 0:
        raise UserError(f"--minutes must be positive, got {minutes}.")
    ensure_data(data_dir)
    open_data(data_dir)
    name = time.strftime("demo-%Y%m%d-%H%M%S")
    # No step limit: the time budget ends the run, and the lr schedule is planned to end with it.
    config = config_lib.load(None, [f"name={name}", f"data.path={data_dir}", "train.max_steps=0",
                                    f"train.max_minutes={minutes}"])
    run_dir = runs_dir / name
    print(f"training {name} for {minutes:g} minutes in {run_dir}")
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
