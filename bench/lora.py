"""LoRA against full fine-tuning: SFT of keel's default model on builtin:stdlib-sft, same steps.

Two SFT runs from the same base, one after the other, each in a fresh process so that its peak
resident memory is its own: full fine-tuning (every weight, keel's default lr) and LoRA (rank 16 on
every linear layer of the blocks, alpha 32, the chat markers' embedding rows trainable, lr 2x: LoRA
takes a higher lr than full fine-tuning, 10x is the usual advice for large models, but keel's default
lr is already high for these small ones and 10x made the supervisor roll the run back twice).
Printed per run: trainable parameters, checkpoint size, peak RSS, median step time, and the
completion loss (nats per completion token) on the whole val split before and after.

The base is keel's default model pretrained for --base-minutes on builtin:python-stdlib, made once
and kept in bench/.cache/lora/base with builtin:stdlib-sft prepared with its tokenizer beside it
(--base / --sft-data use others).

    python bench/lora.py                      # base 5 min (once) + 2 x 60 steps: ~20 minutes on 2 idle cores
    python bench/lora.py --steps 50 --rank 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from keel import config as config_lib
from keel.data import prepare
from keel.inference import evaluate_task, load_run
from keel.runs.registry import Registry
from keel.runs.rundir import init_run_dir
from keel.tasks import build_task
from keel.train import checkpoint as ckpt
from keel.train.loop import train
from keel.train.precision import describe_cpu, pick_device, pick_dtype

sys.path.insert(0, str(Path(__file__).parent))
from throughput import DATA_DIR, prepare_data  # noqa: E402

CACHE = Path(__file__).parent / ".cache" / "lora"


def one(mode: str, base: Path, data: Path, steps: int, rank: int, lr_factor: float, out: Path) -> dict:
    """Train one SFT run in this process; returns its figures."""
    sets = [f"data.path={data}", "task.kind=sft", f"init.from={base}", f"train.max_steps={steps}", "name=lora-bench"]
    defaults = config_lib.load(None, sets)
    if mode == "lora":
        sets += [f"lora.rank={rank}", f"lora.alpha={2 * rank}", f"optim.lr={defaults.optim.lr * lr_factor}"]
    run_dir = out / mode
    config = init_run_dir(config_lib.load(None, sets), run_dir)
    whole = config_lib.apply_overrides(config, ["train.eval_batches=1073741824"])
    device = pick_device(config.train.device)
    task = build_task(whole, device, pick_dtype(config.train.dtype, device))
    before = task.evaluate(task.build_model())["val_loss"]
    with Registry(out / f"{mode}.sqlite") as registry:
        started = time.perf_counter()
        result = train(config, run_dir, registry=registry, progress=False)
        seconds = time.perf_counter() - started
        step_seconds = [v for _, v in registry.metrics(config.name).get("step_seconds", [])]
    loaded = load_run(run_dir)
    after = evaluate_task(loaded)["val_loss"]
    newest = ckpt.list_checkpoints(run_dir)[-1]
    from keel.train.loop import Trainer  # the trainable count as the trainer sees it

    trainer = Trainer(config, run_dir, registry=None, progress=False)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        "mode": mode,
        "lr": config.optim.lr,
        "status": result.status,
        "trainable": trainable,
        "total": loaded.model.num_params(),
        "checkpoint_mb": sum(f.stat().st_size for f in newest.iterdir()) / 1e6,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_s": statistics.median(step_seconds[5:] or step_seconds),
        "seconds": seconds,
        "before": before,
        "after": after,
    }


def default_base(minutes: float) -> tuple[Path, Path]:
    """keel's default model pretrained for `minutes` on the stdlib, and the SFT examples in its tokens (once)."""
    base, sft = CACHE / "base", CACHE / "stdlib-sft"
    if not ckpt.list_checkpoints(base):
        prepare_data()
        print(f"pretraining the default model for {minutes:g} min into {base} (once) ...", flush=True)
        sets = [f"data.path={DATA_DIR.resolve()}", "train.max_steps=0", f"train.max_minutes={minutes}"]
        config = init_run_dir(config_lib.load(None, [*sets, "name=lora-base"]), base)
        train(config, base, registry=None, progress=False)
    if not (sft / "manifest.json").exists():
        prepare(["builtin:stdlib-sft"], sft, tokenizer=str(base), progress=False)
    return base, sft


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, help="pretrained base run (default: made once, see above)")
    parser.add_argument("--base-minutes", type=float, default=5.0, help="pretraining of the default base")
    parser.add_argument("--sft-data", type=Path, help="builtin:stdlib-sft prepared with the base's tokenizer")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr-factor", type=float, default=2.0, help="LoRA's lr over full fine-tuning's")
    parser.add_argument("--one", choices=("full", "lora"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if (args.base is None) != (args.sft_data is None):
        sys.exit("error: pass --base and --sft-data together (SFT data prepared with the base's tokenizer).")
    base, data = (args.base, args.sft_data) if args.base else default_base(args.base_minutes)
    base, data = base.resolve(), data.resolve()

    if args.one:  # a child: one run, figures as JSON on the last line
        print(json.dumps(one(args.one, base, data, args.steps, args.rank, args.lr_factor, args.out)))
        return

    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(f"commit: {commit.stdout.strip() or 'unknown'}   cpu: {describe_cpu()}")
    print(f"machine: {os.cpu_count()} cores, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"base: {base}\nsft data: {data}\n", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("full", "lora"):
            child = [sys.executable, __file__, "--one", mode, "--base", str(base), "--sft-data", str(data)]
            child += ["--steps", str(args.steps), "--rank", str(args.rank), "--lr-factor", str(args.lr_factor)]
            done = subprocess.run([*child, "--out", tmp], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"error: the {mode} run failed:\n{done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    header = (
        f"{'':5} {'lr':>7} {'trainable':>12} {'checkpoint':>10} {'peak RSS':>9} {'step':>7} "
        f"{'completion loss before -> after':>32}"
    )
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['mode']:5} {r['lr']:7.0e} {r['trainable']:>12,} {r['checkpoint_mb']:8.1f}MB {r['peak_rss_mb']:7.0f}MB "
            f"{r['step_s']:6.2f}s {r['before']:15.4f} -> {r['after']:.4f}"
        )
    full, lora = rows
    ratio = {key: lora[key] / full[key] for key in ("trainable", "checkpoint_mb", "peak_rss_mb", "step_s")}
    print(
        f"\nLoRA / full: trainable {ratio['trainable']:.2%}, checkpoint {ratio['checkpoint_mb']:.2f}x, "
        f"peak RSS {ratio['peak_rss_mb']:.2f}x, step time {ratio['step_s']:.2f}x; "
        f"completion loss {lora['after'] - full['after']:+.4f} nats"
    )


if __name__ == "__main__":
    main()
