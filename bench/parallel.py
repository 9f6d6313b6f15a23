"""Data parallelism on this machine: 2 ranks x 1 thread against 1 rank x 2 threads, DDP and FSDP2.

Trains keel's former default model (6 layers, 384 wide, context 256, batch 8, two micro-batches a step:
the same global batch in every row) with `keel train` for a fixed number of steps, three ways:
one process with the machine's two threads, two DDP ranks with one thread each, two FSDP2 ranks
with one thread each. All three compute in the dtype keel picks for this CPU and run eagerly
(FSDP2 runs uncompiled; so do the others here, to compare like with like). It prints tokens/s,
the peak RSS of the largest process (per rank for the two-rank rows), and, measured apart in two
gloo processes, what one step's communication costs: DDP's all-reduce of every gradient, and
FSDP2's all-gather of the weights plus reduce-scatter of the gradients.

    python bench/parallel.py            # ~6 minutes on 2 cores
    python bench/parallel.py --steps 6  # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from keel.config import load
from keel.data import prepare
from keel.models.gpt import GPT
from keel.runs.registry import Registry
from keel.train.precision import describe_cpu, pick_device, pick_dtype

CACHE = Path(__file__).parent / ".cache"
DATA_DIR = CACHE / "python-stdlib-8192"
SHAPE = ["model.n_layer=6", "model.d_model=384", "model.n_head=6"]  # the figures in docs/ are for this shape
SETS = [
    *SHAPE,
    "train.batch_size=8",
    "train.grad_accum=2",
    "train.compile=false",
    "train.eval_every=100000",
    "train.checkpoint_every=100000",
    "train.log_every=1",
]
ROWS = {  # name: (processes, threads per process, parallel)
    "1 rank x 2 threads": (1, 2, "ddp"),
    "2 ranks x 1 thread, DDP": (2, 1, "ddp"),
    "2 ranks x 1 thread, FSDP2": (2, 1, "fsdp"),
}

PEAK_RSS = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def train(name: str, nproc: int, threads: int, parallel: str, steps: int, home: Path) -> dict[str, float]:
    run_dir = home / name.replace(" ", "_").replace(",", "")
    sets = [f"data.path={DATA_DIR}", *SETS, f"train.max_steps={steps}", f"train.parallel={parallel}"]
    command = [sys.executable, "-m", "keel.cli", "train", "--run-dir", str(run_dir), "--nproc", str(nproc)]
    command += [arg for s in sets for arg in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "KEEL_HOME": str(home)}
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    peak_kb = int(result.stderr.strip().splitlines()[-1])
    with Registry(home / "registry.sqlite") as registry:
        run = registry.get_run(run_dir.name)
    return {"tokens_per_s": run["tokens_per_s"], "peak_mb": peak_kb / 1024}


def _collectives(rank: int, numel: int, out: Path) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    grads = torch.randn(numel)
    shard = torch.empty(numel // 2)
    full = torch.empty(numel // 2 * 2)
    times: dict[str, list[float]] = {"all_reduce": [], "all_gather + reduce_scatter": []}
    for _ in range(12):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(grads)
        times["all_reduce"].append(time.perf_counter() - start)
        dist.barrier()
        start = time.perf_counter()
        dist.all_gather_single(full, shard)  # forward's gather; backward gathers again
        dist.all_gather_single(full, shard)
        dist.reduce_scatter_single(shard, full)
        times["all_gather + reduce_scatter"].append(time.perf_counter() - start)
    if rank == 0:
        out.write_text(repr({k: statistics.median(v[2:]) for k, v in times.items()}))
    dist.destroy_process_group()


def collectives(numel: int) -> dict[str, float]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times"
        mp.spawn(_collectives, args=(numel, out), nprocs=2)
        return eval(out.read_text())  # noqa: S307 - our own repr of a dict of floats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    if not (DATA_DIR / "manifest.json").is_file():
        print(f"preparing builtin:python-stdlib into {DATA_DIR} ...")
        prepare(["builtin:python-stdlib"], DATA_DIR, vocab_size=8192, progress=False)
    device = pick_device("auto")
    print(describe_cpu())
    print(f"dtype: {pick_dtype('auto', device)}, {os.cpu_count()} cores, {args.steps} steps of 2 x 8 x 256 tokens")
    config = load(None, ["model.vocab_size=8192", *SHAPE])
    params = GPT.count_params(config.model)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (nproc, threads, parallel) in ROWS.items():
            results[name] = train(name, nproc, threads, parallel, args.steps, Path(tmp))
            r = results[name]
            print(f"{name:28s} {r['tokens_per_s']:8.0f} tokens/s   peak RSS {r['peak_mb']:6.0f} MB per process")
    base = results["1 rank x 2 threads"]["tokens_per_s"]
    for name in list(ROWS)[1:]:
        print(f"{name}: {results[name]['tokens_per_s'] / base:.2f}x the one-process tokens/s")
    comm = collectives(params)
    step_s = 2 * 8 * 256 / results["2 ranks x 1 thread, DDP"]["tokens_per_s"]
    print(f"communication for {params:,} float32 parameters between 2 gloo processes, per step:")
    for what, seconds in comm.items():
        print(f"  {what:30s} {seconds * 1000:7.1f} ms  ({seconds / step_s:.0%} of a DDP step)")


if __name__ == "__main__":
    main()
