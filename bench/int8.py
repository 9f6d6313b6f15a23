"""int8 for CPU inference: generation speed, weight size and held-out bits per byte of float32, bf16 and int8.

One pretraining run (default: keel's default model trained for --minutes on builtin:python-stdlib, or the
run given with --run) is loaded four ways, one after the other, on the CPU:

- float32: as trained;
- bfloat16: parameters cast to bf16 (rotary tables stay float32), computed in bf16 — emulated, and so
  slow, on CPUs without AVX512-BF16/AMX;
- int8: `keel sample/eval/chat --int8` (keel.models.quantize: the blocks' linear layers as dynamically
  quantized int8, through fbgemm);
- torchao int8 weight-only (`Int8WeightOnlyConfig` on the same layers), only when torchao imports; it is
  not a keel dependency, and is here to show why keel does not use it.

For each: the bytes of the weights (keel.models.quantize.model_bytes), greedy generation tokens/s at batch
1 (a 16-token prompt from the val split, --new-tokens new tokens with the KV cache, median of --repeats
after one warm-up), evaluation tokens/s and bits per byte over the whole val split (`keel eval`), and how
many of the greedy tokens equal float32's before the first difference.

    python bench/int8.py                                   # trains the model first (--minutes 6), then ~5 min
    python bench/int8.py --run bench/.cache/int8/base      # reuse a run

Threads: torch uses --threads (default 1; the machine is shared). Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from keel.data import open_data
from keel.inference import LoadedRun, evaluate_run, load_run
from keel.models.quantize import model_bytes
from keel.train.precision import describe_cpu

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "int8"


def train_base(run_dir: Path, data_dir: Path, minutes: float) -> None:
    """keel's default model on the stdlib for `minutes` (keel train, so the supervisor and compile are as usual)."""
    if not (data_dir / "manifest.json").is_file():
        from keel.demo import ensure_data

        ensure_data(data_dir)
    sets = [f"data.path={data_dir}", f"train.max_minutes={minutes}", "train.max_steps=0"]
    command = [sys.executable, "-m", "keel.cli", "train", "--run-dir", str(run_dir)]
    subprocess.run([*command, *[arg for s in sets for arg in ("--set", s)]], check=True)


def variants(run_dir: Path):
    """(name, loaded run) for each way of running the model, loaded one at a time."""
    yield "float32", load_run(run_dir, device="cpu")
    run = load_run(run_dir, device="cpu")
    run.model.to(torch.bfloat16)
    run.model.rope_cos, run.model.rope_sin = run.model.rope_cos.float(), run.model.rope_sin.float()
    yield "bfloat16", dataclasses.replace(run, dtype=torch.bfloat16)
    yield "int8 (keel --int8)", load_run(run_dir, int8=True)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return
    run = load_run(run_dir, device="cpu")
    quantize_(run.model.blocks, Int8WeightOnlyConfig())
    yield "torchao int8 weight-only", run


def greedy(run: LoadedRun, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
    start = time.perf_counter()
    out = run.model.generate(prompt, new_tokens, temperature=0)  # no end token: always new_tokens long
    return out[0, prompt.shape[1] :].tolist(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a pretraining run to load (default: train one into --out)")
    parser.add_argument("--out", type=Path, default=CACHE / "base", help="where the trained run goes")
    parser.add_argument("--data", type=Path, default=Path("data/python-stdlib"), help="prepared stdlib data")
    parser.add_argument("--minutes", type=float, default=6.0, help="training time when no --run is given")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_dir = args.run
    if run_dir is None:
        run_dir = args.out
        if not (run_dir / "checkpoints").is_dir():
            train_base(run_dir, args.data, args.minutes)

    first = load_run(run_dir, device="cpu")
    config = first.config
    val = open_data(Path(config.data.path)).tokens("val")
    prompt = torch.tensor(np.asarray(val[1:17], dtype=np.int64))[None]  # (1, 16), after the first <|endoftext|>
    new_tokens = min(args.new_tokens, config.model.context_length - prompt.shape[1])
    del first

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    print(f"# python bench/int8.py {' '.join(sys.argv[1:])}")
    print(f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit.stdout.strip()}")
    print(f"cpu: {describe_cpu()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)")
    model = config.model
    print(
        f"model: {model.n_layer} layers x {model.d_model} wide, {model.n_head} heads, vocab {model.vocab_size}, "
        f"context {model.context_length}, tied embeddings {model.tie_embeddings}; run {run_dir} at step "
        f"{load_run(run_dir, device='cpu').step}; load average before {os.getloadavg()[0]:.1f}\n",
        flush=True,
    )
    rows, reference = [], None
    for name, run in variants(run_dir):
        with torch.no_grad():
            greedy(run, prompt, 8)  # warm-up
            timings, tokens = [], []
            for _ in range(args.repeats):
                tokens, seconds = greedy(run, prompt, new_tokens)
                timings.append(seconds)
        reference = reference or tokens
        same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(tokens))
        start = time.perf_counter()
        result = evaluate_run(run)
        eval_seconds = time.perf_counter() - start
        rows.append(
            (
                name,
                model_bytes(run.model) / 1e6,
                new_tokens / statistics.median(timings),
                result.tokens / eval_seconds,
                result.bits_per_byte,
                same,
            )
        )
        print(f"{name}: done, load average {os.getloadavg()[0]:.1f}", flush=True)
        del run

    base_bpb = rows[0][4]
    print(
        f"\n| variant | weights (MB) | generation tokens/s (batch 1, {new_tokens} new) | eval tokens/s "
        f"| val bits/byte | change | greedy tokens equal to float32's |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, megabytes, generation, evaluation, bpb, same in rows:
        print(
            f"| {name} | {megabytes:.1f} | {generation:.1f} | {evaluation:,.0f} | {bpb:.4f} | "
            f"{bpb - base_bpb:+.4f} | {same} of {new_tokens} |"
        )


if __name__ == "__main__":
    main()
