"""`keel demo`: the whole pipeline on the Python standard library in a bounded time.

Pretraining on builtin:python-stdlib, then supervised fine-tuning on builtin:stdlib-sft (a
function's signature and docstring -> its body) and DPO on builtin:stdlib-pref (the real body
preferred to a mechanically corrupted one), each stage a supervised run started from the last.
"""

from __future__ import annotations

import time
from pathlib import Path

from keel import config as config_lib
from keel.data import open_data, prepare
from keel.errors import UserError
from keel.inference import evaluate_run, evaluate_task, load_run, sample
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
    print(
        f"prepared {splits['train']['documents']} train / {splits['val']['documents']} val documents, "
        f"{splits['train']['tokens']:,} / {splits['val']['tokens']:,} tokens in {data_dir}"
    )


def run_demo(
    minutes: float,
    finetune_minutes: float = 2.0,
    data_dir: Path = Path("data/python-stdlib"),
    runs_dir: Path = Path("runs"),
) -> Path:
    if minutes <= 0:
        raise UserError(f"--minutes must be positive, got {minutes}.")
    if finetune_minutes < 0:
        raise UserError(f"--finetune-minutes must be >= 0 (0 skips SFT and DPO), got {finetune_minutes}.")
    ensure_data(data_dir)
    open_data(data_dir)
    name = time.strftime("demo-%Y%m%d-%H%M%S")
    # No step limit: the time budget ends the run, and the lr schedule is planned to end with it.
    config = config_lib.load(
        None, [f"name={name}", f"data.path={data_dir}", "train.max_steps=0", f"train.max_minutes={minutes}"]
    )
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
    print(
        f"\nval loss {result.loss:.3f}  perplexity {result.perplexity:.1f}  "
        f"bits/byte {result.bits_per_byte:.3f}  ({result.tokens:,} held-out tokens)"
    )
    print(f"\nthe run lives in {run_dir}: keel sample {run_dir} --prompt 'def '; keel eval {run_dir}; keel runs")
    if finetune_minutes == 0:
        return run_dir
    sft_dir = finetune(run_dir, "sft", "builtin:stdlib-sft", finetune_minutes)
    finetune(sft_dir, "dpo", "builtin:stdlib-pref", finetune_minutes)
    return run_dir


def finetune(init_dir: Path, kind: str, source: str, minutes: float) -> Path:
    """Prepare `source` with init_dir's tokenizer and train task `kind` from it; print held-out numbers."""
    data_dir = init_dir.parent / f"{init_dir.name}-{source.removeprefix('builtin:')}"
    if not (data_dir / "manifest.json").is_file():
        print(f"\npreparing {source} with the tokenizer of {init_dir} ...")
        prepare([source], data_dir, tokenizer=str(init_dir), progress=False)
    run_dir = init_dir.parent / f"{init_dir.name}-{kind}"
    config = config_lib.load(
        None,
        [
            f"name={run_dir.name}",
            f"task.kind={kind}",
            f"data.path={data_dir}",
            f"init.from={init_dir}",
            "train.max_steps=0",
            f"train.max_minutes={minutes}",
            "optim.lr=1e-4" if kind == "dpo" else "optim.lr=3e-4",
            "optim.warmup_steps=20",
        ],
    )
    print(f"{kind}: training {run_dir.name} for {minutes:g} minutes from {init_dir}")
    code = launch(config, run_dir)
    if code != 0:
        raise UserError(f"{kind} stopped with exit code {code}; see `keel logbook {run_dir}`.")
    numbers = evaluate_task(load_run(run_dir))
    print(
        f"{kind} held-out: "
        + "  ".join(f"{k.removeprefix('val_').replace('_', ' ')} {v:.4f}" for k, v in numbers.items())
    )
    return run_dir
