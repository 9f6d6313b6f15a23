"""What distillation buys: a small student taught by a teacher run, against the same student from scratch.

Runs, one after the other (never together: the machine has 2 cores), all on builtin:python-stdlib
prepared once in bench/.cache (8192-token BPE, shared with bench/throughput.py), all uncompiled so the
comparison does not depend on compile times:

1. teacher: 4 x 256 at context 128 (a third of keel's default model, so the whole bench fits in well
   under an hour on a shared 2-core machine), --teacher-steps steps (or the run given with --teacher,
   reused as it is);
2. the teacher's cache: its top-k log-probs on the windows the student will train on, built once
   and timed on its own (it is part of the distilled student's wall clock);
3. distilled: the student (2 x 128 by default) with task.kind=distill, --student-steps steps;
4. scratch: the same student, same data, seed and steps, task.kind=pretrain;
5. scratch at equal wall clock: the same student from scratch for the minutes that the cache build and
   the distilled run took together (train.max_minutes, so its lr schedule ends with them).

Every model is scored on the whole val split (bits per byte, as `keel eval`). The table gives
parameters, training tokens/s (the run's tokens over its training time), generation tokens/s (one
prompt, 128 new tokens sampled with a KV cache, after one warm-up), and val bits/byte.

    python bench/distill.py                        # teacher 400 steps + cache + 3 students: ~25 minutes idle
    python bench/distill.py --teacher bench/.cache/distill/DATE/teacher     # reuse a teacher
    python bench/distill.py --quick                # smoke run: tiny models, ~3 minutes
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from keel import config as config_lib
from keel.inference import evaluate_run, load_run
from keel.runs.rundir import init_run_dir
from keel.tasks import build_task
from keel.train.loop import train
from keel.train.precision import describe_cpu, pick_device, pick_dtype

sys.path.insert(0, str(Path(__file__).parent))
from throughput import DATA_DIR, prepare_data  # noqa: E402

CACHE = Path(__file__).parent / ".cache"
COMMON = ["train.compile=false", "train.batch_size=8", "train.eval_every=100000", "train.log_every=50"]
TEACHER = ["model.n_layer=4", "model.d_model=256", "model.n_head=4", "model.context_length=128"]
STUDENT = ["model.n_layer=2", "model.d_model=128", "model.n_head=4", "model.context_length=128"]
QUICK_TEACHER = ["model.n_layer=2", "model.d_model=128", "model.n_head=4", "model.context_length=128"]
QUICK_STUDENT = ["model.n_layer=1", "model.d_model=64", "model.n_head=2", "model.context_length=128"]
GENERATE_TOKENS = 128


def run(run_dir: Path, sets: list[str]) -> dict:
    """Train a run in this process; its wall time, training tokens/s and final numbers."""
    config = init_run_dir(config_lib.load(None, sets), run_dir)
    start = time.perf_counter()
    result = train(config, run_dir, registry=None, progress=False)
    seconds = time.perf_counter() - start
    assert result.status in ("finished", "time_limit"), (run_dir, result.status, result)
    return {"seconds": seconds, "steps": result.steps, "tokens_per_s": result.tokens_per_s}


def score(run_dir: Path) -> dict:
    """Parameters, val bits/byte over the whole val split, generation tokens/s."""
    loaded = load_run(run_dir)
    params = sum(p.numel() for p in loaded.model.parameters())
    bits = evaluate_run(loaded).bits_per_byte
    prompt = torch.tensor([loaded.tokenizer.encode("def parse(text):\n    ").ids], device=loaded.device)
    rates = []
    for _ in range(3):  # one warm-up, then the best of two
        generator = torch.Generator(device=loaded.device).manual_seed(0)
        start = time.perf_counter()
        with torch.no_grad():
            out = loaded.model.generate(prompt, GENERATE_TOKENS, temperature=1.0, generator=generator)
        rates.append((out.shape[1] - prompt.shape[1]) / (time.perf_counter() - start))
    return {"params": params, "bits_per_byte": bits, "generate_tokens_per_s": max(rates[1:])}


def build_cache(config_sets: list[str], run_dir: Path) -> float:
    """Build the teacher's cache for this student config; its seconds."""
    config = init_run_dir(config_lib.load(None, config_sets), run_dir)
    device = pick_device(config.train.device)
    start = time.perf_counter()
    build_task(config, device, pick_dtype(config.train.dtype, device))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=CACHE / "distill" / time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="prepared stdlib data (prepared if missing)")
    parser.add_argument("--teacher", type=Path, help="reuse this trained teacher run")
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--student-steps", type=int, default=500)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--set", action="append", default=[], help="distillation settings, e.g. distill.ratio=0.9")
    args = parser.parse_args()
    if args.data == DATA_DIR:
        prepare_data()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    teacher_shape, student_shape = (QUICK_TEACHER, QUICK_STUDENT) if args.quick else (TEACHER, STUDENT)
    if args.quick:
        args.teacher_steps, args.student_steps = min(args.teacher_steps, 150), min(args.student_steps, 150)
    data = [f"data.path={args.data.resolve()}"]
    numbers: dict[str, dict] = {}

    teacher = args.teacher
    if teacher is None:
        teacher = out / "teacher"
        print(f"teacher: {args.teacher_steps} steps ...", flush=True)
        numbers["teacher"] = run(teacher, [*data, *COMMON, *teacher_shape, f"train.max_steps={args.teacher_steps}"])
    student = [*data, *COMMON, *student_shape, f"train.max_steps={args.student_steps}"]
    distill_sets = ["task.kind=distill", f"distill.teacher={teacher.resolve()}", *args.set]

    print("teacher cache ...", flush=True)
    cache_seconds = build_cache([*student, *distill_sets], out / "distilled")
    print(f"  {cache_seconds:.0f} s", flush=True)
    print(f"distilled student: {args.student_steps} steps ...", flush=True)
    numbers["distilled"] = run(out / "distilled", [*student, *distill_sets])
    print(f"scratch student: {args.student_steps} steps ...", flush=True)
    numbers["scratch"] = run(out / "scratch", student)
    budget = cache_seconds + numbers["distilled"]["seconds"]
    print(f"scratch student: {budget / 60:.2f} minutes (the distilled student's wall clock) ...", flush=True)
    equal_time = [*data, *COMMON, *student_shape, "train.max_steps=0", f"train.max_minutes={budget / 60:.4f}"]
    numbers["scratch, equal wall clock"] = run(out / "scratch-equal-time", equal_time)

    dirs = {
        "teacher": teacher,
        "distilled": out / "distilled",
        "scratch": out / "scratch",
        "scratch, equal wall clock": out / "scratch-equal-time",
    }
    for name, run_dir in dirs.items():
        numbers.setdefault(name, {}).update(score(run_dir))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\n{time.strftime('%Y-%m-%d')}, commit {commit}, {describe_cpu()}, {torch.get_num_threads()} threads")
    print(f"command: python bench/distill.py {shlex.join(sys.argv[1:])}")
    print(f"data: {args.data}; runs in {out}; distill settings: {' '.join(args.set) or 'defaults'}")
    print(f"teacher cache: {cache_seconds:.0f} s for {args.student_steps * 8} windows\n")
    print("| model | parameters | steps | wall clock | training tokens/s | generation tokens/s | val bits/byte |")
    print("|---|---|---|---|---|---|---|")
    for name, n in numbers.items():
        seconds = n.get("seconds")
        wall = f"{seconds / 60:.1f} min" if seconds else "(reused)"
        if name == "distilled":
            wall = f"{(seconds + cache_seconds) / 60:.1f} min ({cache_seconds / 60:.1f} cache)"
        rate = f"{n['tokens_per_s']:,.0f}" if "tokens_per_s" in n else "-"
        print(
            f"| {name} | {n['params'] / 1e6:.2f}M | {n.get('steps', '-')} | {wall} | {rate} "
            f"| {n['generate_tokens_per_s']:,.0f} | {n['bits_per_byte']:.4f} |"
        )
    print(f"\nOMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


if __name__ == "__main__":
    main()
