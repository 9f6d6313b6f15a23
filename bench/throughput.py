"""Training throughput of keel against two peers, on this machine, in one run.

For each model size it trains keel (its defaults: the dtype and attention keel picks by itself;
AdamW like the peers, since the pretraining default Muon is a recipe choice that bench/quality.py
judges by what it learns, not an engine speed), a plain PyTorch loop over Hugging Face
LlamaForCausalLM with the same architecture, and a nanoGPT-style loop (bench/_peers.py), all on the
same token batches from the Python standard library. Every implementation computes in the dtype
keel's `train.dtype=auto` picks on this CPU (bf16 autocast where the CPU has native bf16, float32
where bf16 is emulated); the first lines name the CPU and its class. It prints tokens/s (from the
median step time, and the mean), model FLOP utilisation against the 2048x2048 GEMM peak of the
dtype the run computes in, measured in the same process just before and just after it trains (the
better of the two) and against a GEMM probe run just before each step ("paired"), peak memory, the
split of step time between data, forward/backward, optimizer and logging, and the keel/peer ratios.

Each measurement runs in a fresh subprocess of this script, because a process's peak RSS
cannot be reset. Warm-up steps are excluded from tokens/s and from the time split.

    python bench/throughput.py            # the real measurement, ~5-10 minutes on 2 cores
    python bench/throughput.py --quick    # smoke run, ~1 minute
    python bench/throughput.py --set train.compile=false   # keel with config overrides
"""

from __future__ import annotations

import argparse
import dataclasses
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

import torch

from keel.config import load
from keel.data import get_batch, open_data, prepare
from keel.models.gpt import mlp_hidden_size
from keel.train.loop import Trainer, should_compile
from keel.train.precision import describe_cpu, pick_device, pick_dtype

sys.path.insert(0, str(Path(__file__).parent))
from _peers import GemmProbe, Shape, gemm_gflops, llama_peer, nanogpt_peer, peer_dtype, train_peer  # noqa: E402

CACHE = Path(__file__).parent / ".cache"
DATA_DIR = CACHE / "python-stdlib-8192"
VOCAB_SIZE = 8192
PHASES = ("data", "forward_backward", "optimizer", "logging")
IMPLS = ("keel", "llama", "nanogpt")

# (n_layer, d_model, n_head, context_length, batch_size); mid has 2.3x the parameters of small.
SIZES = {"small": (6, 384, 6, 256, 8), "mid": (8, 512, 8, 256, 8)}
FULL = {"warmup": 5, "steps": 30, "gemm_seconds": 3.0}
# The smoke run keeps the two architectures but halves the context and the batch.
QUICK = {"warmup": 2, "steps": 4, "gemm_seconds": 1.0, "context_length": 128, "batch_size": 4}


def keel_shape(size: str, quick: bool, overrides: list[str]) -> tuple[Shape, list[str]]:
    """The Shape every implementation trains, and keel's config overrides that produce it."""
    n_layer, d_model, n_head, context_length, batch_size = SIZES[size]
    if quick:
        context_length, batch_size = QUICK["context_length"], QUICK["batch_size"]
    sets = [
        f"model.n_layer={n_layer}",
        f"model.d_model={d_model}",
        f"model.n_head={n_head}",
        f"model.n_kv_head={n_head}",
        f"model.context_length={context_length}",
        f"model.vocab_size={VOCAB_SIZE}",
        f"train.batch_size={batch_size}",
        f"data.path={DATA_DIR}",
        "optim.optimizer=adamw",  # the peers' optimizer: this bench compares engines
    ] + overrides
    config = load(None, sets)
    m, t = config.model, config.train
    shape = Shape(
        m.n_layer,
        m.d_model,
        m.n_head,
        m.n_kv_head,
        mlp_hidden_size(m),
        m.vocab_size,
        m.context_length,
        t.batch_size * t.grad_accum,
    )
    return shape, sets


# ---------------------------------------------------------------------------------------------
# one measurement, in its own process


class ProbedTrainer(Trainer):
    """The real training loop, timed from step `warmup` on, with a GEMM probe run before each timed step.

    The phase timers restart at step `warmup` and the start of every later step is noted; the
    probes are left out of the step times. The batch cursor counts the steps taken so far, so it
    names the first timed step.
    """

    def __init__(self, *args, warmup: int, probe: GemmProbe, **kwargs):
        super().__init__(*args, **kwargs)
        self.warmup, self.probe = warmup, probe
        self.step_starts: list[float] = []
        self.probe_spans: list[float] = []

    def launch(self, cursor: int):
        if cursor == self.warmup:
            self.timer.seconds.clear()
        if cursor >= self.warmup:
            before = self.probe.seconds
            self.probe()
            self.probe_spans.append(self.probe.seconds - before)
            self.step_starts.append(time.perf_counter())
        return super().launch(cursor)

    def step_seconds(self) -> list[float]:
        """Whole iterations, from one timed step's start to the next one's, less the probe run between them."""
        return [b - a - span for a, b, span in zip(self.step_starts, self.step_starts[1:], self.probe_spans[1:])]


def measure_keel(sets: list[str], warmup: int, steps: int) -> dict[str, object]:
    # Evaluation and checkpoints happen only at the end and are not counted; the rest is keel's defaults.
    config = load(
        None,
        sets
        + [
            f"train.max_steps={warmup + steps}",
            f"train.eval_every={warmup + steps}",
            f"train.checkpoint_every={warmup + steps}",
            "train.eval_batches=1",
        ],
    )
    if config.train.compile == "auto":
        # Decide as for a run of the default length, not for this short measurement (the compilation
        # itself falls into the warm-up steps).
        config.train.compile = should_compile(load(None).train, 0, pick_device(config.train.device))

    with tempfile.TemporaryDirectory() as run_dir:
        probe = GemmProbe(pick_dtype(config.train.dtype, pick_device(config.train.device)))
        trainer = ProbedTrainer(config, Path(run_dir), registry=None, progress=False, warmup=warmup, probe=probe)
        result = trainer.run()
        seconds = time.perf_counter() - trainer.step_starts[0] - sum(trainer.probe_spans[1:])
    if result.status != "finished":
        sys.exit(
            f"keel stopped before its last step ({result.status} {result.diagnosis}), so its figures would be wrong"
        )
    timings = result.timings
    seconds -= timings.get("eval", 0.0) + timings.get("checkpoint", 0.0)
    tokens_per_step = config.train.batch_size * config.train.grad_accum * config.model.context_length
    step_seconds = trainer.step_seconds() or [seconds]
    return {
        "tokens_per_s": tokens_per_step * steps / seconds,
        "tokens_per_step": tokens_per_step,
        "step_seconds": step_seconds,
        "seconds": seconds,
        "final_loss": result.final_loss,
        "timings": {k: timings.get(k, 0.0) for k in PHASES},
        "dtype": str(trainer.dtype).removeprefix("torch."),
        "flops_per_token": trainer.model.flops_per_token(),
        "params": trainer.model.num_params(),
        "compiled": trainer.compiled,
        "probe_gflops": probe.rates,
    }


def measure_peer(impl: str, shape: Shape, sets: list[str], warmup: int, steps: int) -> dict[str, object]:
    config = load(None, sets)
    torch.manual_seed(config.train.seed)
    if impl == "llama":
        model, optimizer, dtype, flops = llama_peer(
            shape, config.model.rope_theta, config.model.norm_eps, config.model.tie_embeddings
        )
    else:
        model, optimizer, dtype, flops = nanogpt_peer(shape)
    tokens = open_data(Path(config.data.path)).tokens("train")

    def next_batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        # keel's sampler with keel's seed: every implementation sees the same batches.
        return get_batch(tokens, shape.context_length, shape.batch_size, config.train.seed, index)

    probe = GemmProbe(dtype)
    result = train_peer(model, optimizer, dtype, next_batch, steps, warmup, probe=probe)
    return result | {
        "dtype": str(dtype).removeprefix("torch."),
        "flops_per_token": flops,
        "params": sum(p.numel() for p in model.parameters()),
        "compiled": False,
        "probe_gflops": probe.rates,
    }


def compute_dtype(impl: str, sets: list[str]) -> torch.dtype:
    """The dtype a measurement computes in: keel's from its config, a peer's from keel's rule for this CPU."""
    if impl == "keel":
        train_config = load(None, sets).train
        return pick_dtype(train_config.dtype, pick_device(train_config.device))
    return peer_dtype()


def worker(job: dict) -> None:
    """Run one measurement and print it as the last line of stdout, with the process's peak RSS."""
    shape = Shape(**job["shape"])
    # The machine's speed drifts by tens of percent over minutes when it is shared, so each run is
    # compared with the GEMM peak measured in its own process, just before and just after it trains:
    # the better of the two, as a slow moment must not shrink the denominator (and inflate the MFU).
    # Only the dtype the run computes in is measured: the MFU is against that dtype's peak.
    dtype = compute_dtype(job["impl"], job["sets"])
    before = gemm_gflops(dtype, seconds=job["gemm_seconds"])
    if job["impl"] == "keel":
        result = measure_keel(job["sets"], job["warmup"], job["steps"])
    else:
        result = measure_peer(job["impl"], shape, job["sets"], job["warmup"], job["steps"])
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    assert result["dtype"] == str(dtype).removeprefix("torch."), (result["dtype"], dtype)
    result["gemm_peak"] = max(before, gemm_gflops(dtype, seconds=job["gemm_seconds"]))
    print(json.dumps(result))


def run_job(job: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{job['impl']} / {job['size']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# the report


def print_machine() -> None:
    """The bench's first lines after the command: the CPU and its class, then the rest of the machine."""
    load_average = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print("cpu:", describe_cpu())
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"peers compute in {str(peer_dtype()).removeprefix('torch.')}, load average {load_average}"
    )


def prepare_data() -> None:
    """Tokens from the Python standard library, prepared once by keel and reused across runs."""
    if not (DATA_DIR / "manifest.json").exists():
        print(f"preparing {DATA_DIR} (once) ...", flush=True)
        prepare(["builtin:python-stdlib"], DATA_DIR, vocab_size=VOCAB_SIZE, progress=False)


def mfu(r: dict) -> float:
    """Model FLOPs per second at the median step over the GEMM peak of the dtype the run computed in."""
    return r["flops_per_token"] * r["typical_tokens_per_s"] / (r["gemm_peak"] * 1e9)


def paired_mfu(r: dict) -> float:
    """The median over timed steps of each step's FLOP rate over the GEMM probe taken just before it."""
    flops_per_step = r["flops_per_token"] * r["tokens_per_step"]
    return statistics.median(
        flops_per_step / seconds / (gflops * 1e9) for seconds, gflops in zip(r["step_seconds"], r["probe_gflops"])
    )


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:5.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, context 128, batch 4 (~1 minute)")
    parser.add_argument(
        "--sizes", default=",".join(SIZES), help=f"comma-separated model sizes among {', '.join(SIZES)}"
    )
    parser.add_argument(
        "--impls", default=",".join(IMPLS), help=f"comma-separated implementations among {', '.join(IMPLS)}"
    )
    parser.add_argument("--steps", type=int, help="timed steps per measurement (default 30, quick 4)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them (default 5, quick 2)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keel config override, e.g. train.compile=false (repeatable; model.* keys reshape the peers too)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement in a child process
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    plan = QUICK if args.quick else FULL
    warmup = plan["warmup"] if args.warmup is None else args.warmup
    steps = plan["steps"] if args.steps is None else args.steps
    sizes, impls = args.sizes.split(","), args.impls.split(",")
    if unknown := set(sizes) - set(SIZES):
        parser.error(f"unknown size {', '.join(sorted(unknown))}; choose among {', '.join(SIZES)}")
    if unknown := set(impls) - set(IMPLS):
        parser.error(f"unknown implementation {', '.join(sorted(unknown))}; choose among {', '.join(IMPLS)}")
    if steps < 1 or warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")

    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    print_machine()
    prepare_data()
    print(f"{warmup} warm-up + {steps} timed steps per run; each run in its own process\n")

    started = time.perf_counter()
    results: dict[tuple[str, str], dict] = {}
    header = (
        f"{'size':<6} {'impl':<8} {'shape L/d/h/T/B':<17} {'params':>7} {'dtype':<8} {'tok/s':>7} {'mean':>7} "
        f"{'MFU':>6} {'peak':>5} {'paired':>6} {'RSS MiB':>8} {'data':>6} {'fwd/bwd':>7} {'optim':>6} {'log':>6} "
        f"{'other':>6} {'loss':>6}"
    )
    print(header)
    print("-" * len(header))
    for size in sizes:
        shape, sets = keel_shape(size, args.quick, args.overrides)
        for impl in impls:
            job = {
                "impl": impl,
                "size": size,
                "shape": dataclasses.asdict(shape),
                "sets": sets,
                "warmup": warmup,
                "steps": steps,
                "gemm_seconds": plan["gemm_seconds"],
            }
            r = results[size, impl] = run_job(job)
            r["typical_tokens_per_s"] = r["tokens_per_step"] / statistics.median(r["step_seconds"])
            split = [r["timings"][k] for k in PHASES]
            name = impl + ("+c" if r["compiled"] else "")
            dims = f"{shape.n_layer}/{shape.d_model}/{shape.n_head}/{shape.context_length}/{shape.batch_size}"
            print(
                f"{size:<6} {name:<8} {dims:<17} {r['params'] / 1e6:6.1f}M {r['dtype']:<8} "
                f"{r['typical_tokens_per_s']:7.0f} {r['tokens_per_s']:7.0f} {100 * mfu(r):5.1f}% "
                f"{r['gemm_peak']:5.0f} {100 * paired_mfu(r):5.1f}% {r['peak_rss_mib']:8.0f} "
                + " ".join(f"{percent(s, r['seconds']):>6}" for s in split)
                + f" {percent(r['seconds'] - sum(split), r['seconds']):>6} {r['final_loss']:6.3f}",
                flush=True,
            )
    print(
        "\ntok/s = tokens per step / median step time, and 'mean' = tokens / total time: other processes on a "
        "shared machine only ever slow steps down, so the median step is the one to compare (the GEMM peak is also "
        "the best stretch, not the mean).\nMFU = flops_per_token x tok/s / peak, the best GFLOP/s of a 2048x2048 "
        "GEMM in the dtype the run computes in (the dtype column), measured in the run's own process just before "
        "and just after it trains (the better of the two); 'paired' = the median over timed steps of each step's "
        "FLOP rate over a GEMM probe in the same dtype (best of three 2048x2048 matmuls) run just before that "
        "step, off the clock, so that a slow stretch of the machine slows both; 'other' is step time outside the "
        "four phases (supervisor, lr schedule, bookkeeping)."
    )

    if "keel" in impls:
        print(
            "\nkeel against the peers, each in its own dtype (issue 4 targets for mid: >= 3.5x nanogpt, "
            ">= 1.3x llama, >= 70% of the GEMM peak, data+logging < 3% of step time)"
        )
        for size in sizes:
            keel = results[size, "keel"]
            ratios = [
                f"{keel['typical_tokens_per_s'] / results[size, peer]['typical_tokens_per_s']:.2f}x {peer}"
                for peer in impls
                if peer != "keel"
            ]
            data_log = sum(keel["timings"][k] for k in ("data", "logging")) / keel["seconds"]
            print(
                f"  {size:<6} tokens/s {', '.join(ratios) or '(no peer run)'}; {100 * mfu(keel):.1f}% of the "
                f"{keel['dtype']} peak ({100 * paired_mfu(keel):.1f}% paired); data+logging {100 * data_log:.1f}%"
            )
    load_average = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average now {load_average}")


if __name__ == "__main__":
    main()
