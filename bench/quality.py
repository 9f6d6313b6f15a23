"""What a user gets in a fixed time: bits per byte on held-out Python stdlib files, keel against nanoGPT.

The trainers run one after the other (never together: the machine has 2 cores), each for the same
wall-clock budget on the same train files, and are evaluated on the whole val split. A row each:

- `keel`: keel's default recipe (`keel.config.load(None, ...)`) and no step limit: train.max_minutes
  ends the run and plans its lr schedule to end with the budget; plus any `--set` overrides;
- `nanogpt-bpe` (`--peer tokens`, the default and the headline): nanoGPT's GPT-2 block and recipe
  (bench/_nanogpt_peer.py) on the same tokens as keel: keel's BPE token shards and vocabulary,
  scored on the very val windows keel scores, at nanoGPT's own small shape (6 layers, 384 wide,
  context 256; batch 8), whatever keel's default is;
- `nanogpt-byte` (`--peer bytes`): the same trainer on the same documents as UTF-8 bytes.

Both peers compute in the dtype keel's `train.dtype=auto` picks on this CPU (the first lines name
the CPU's class) and plan their cosine from their measured speed so that it ends with the budget.
Bits per byte divides the nats on the val split by its UTF-8 bytes, so byte-level and BPE models
compare fairly. The issue's target is keel/nanogpt-bpe <= 0.8.

    python bench/quality.py                      # keel and nanogpt-bpe, 10 minutes each, ~22 minutes in all
    python bench/quality.py --peer both          # all three rows, ~33 minutes
    python bench/quality.py --quick              # 1 minute each, a smoke run
    python bench/quality.py --only peer --peer bytes --minutes 3
    python bench/quality.py --only keel --minutes 3 --set optim.lr=2e-3 --set optim.schedule=cosine
    python bench/quality.py --only keel --minutes 6 --set train.max_steps=400   # fixed schedule, budget as a cap
    python bench/quality.py --only keel --ablate zero_init   # a recipe change of bench/_ablations.py
    python bench/quality.py --float32            # both in float32, what a CPU without native bf16 computes
    python bench/quality.py --minutes 30 --keep /tmp/q30   # keep keel's run: `keel logbook /tmp/q30/quality`

keel's row also prints its val loss at every evaluation (train.eval_batches batches), so recipes
that differ in speed compare at equal steps as well as at equal time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _ablations import ABLATIONS  # noqa: E402
from _nanogpt_peer import byte_stream, token_stream, train_and_evaluate  # noqa: E402
from _peers import Shape  # noqa: E402
from throughput import DATA_DIR, prepare_data, print_machine  # noqa: E402


def run_keel(minutes: float, overrides: list[str], ablations: list[str], keep: Path | None) -> dict:
    from keel import config as config_lib
    from keel.inference import evaluate_run, load_run
    from keel.models.gpt import GPT
    from keel.runs.registry import Registry
    from keel.runs.rundir import LOGBOOK_FILE, init_run_dir
    from keel.supervisor.logbook import read_logbook
    from keel.train.loop import train
    from keel.train.precision import pick_device, pick_dtype

    # A max_steps given with --set fixes the schedule (the budget still caps it), so recipes compare
    # at equal steps on a noisy machine.
    config = config_lib.load(
        None, [f"data.path={DATA_DIR}", "name=quality", "train.max_steps=0", f"train.max_minutes={minutes}"] + overrides
    )
    dtype = pick_dtype(config.train.dtype, pick_device(config.train.device))
    for name in ablations:
        ABLATIONS[name]()
    if keep:
        keep.mkdir(parents=True)
    with contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "quality"
        config = init_run_dir(config, run_dir)
        # A registry of its own only to read back the val loss at each evaluation: recipes that
        # differ in speed compare at equal steps too.
        with Registry(Path(tmp) / "registry.sqlite") as registry:
            result = train(config, run_dir, registry=registry, progress=False)
            registry.flush()
            val_curve = registry.metrics(config.name, "val_loss").get("val_loss", [])
        evaluation = evaluate_run(load_run(run_dir), Path(config.data.path))
        logbook = read_logbook(run_dir / LOGBOOK_FILE)
        repairs = Counter(e["name"] for e in logbook if e["kind"] == "action")
        # what it saw: signals, and the divergences the held-out loss did not confirm
        seen = [e for e in logbook if e["kind"] == "signal" or e["name"] == "divergence_unconfirmed"]
        signals = Counter(e["name"] for e in seen)
        # what led to repairs beyond rung 1's skips, and the repairs, as the logbook tells them: the run
        # directory is temporary unless --keep
        routine = {("action", "skip_update"), ("signal", "grad_spike")}
        told = [
            f"step {e['step']}: {e['message']}"
            for e in logbook
            if (e["kind"] in ("signal", "action") or e["name"] == "divergence_unconfirmed")
            and (e["kind"], e["name"]) not in routine
        ]
    m = config.model
    return {
        "bits_per_byte": evaluation.bits_per_byte,
        "val_loss": evaluation.loss,
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "status": result.status,
        "repairs": repairs,  # the supervisor's actions: a healthy recipe should need none
        "signals": signals,  # and what it saw
        "told": told,
        "val_curve": val_curve,  # [(step, val nats on train.eval_batches batches)]
        "final_loss": result.final_loss,
        "params": GPT(m).num_params(),
        "shape": f"{m.n_layer}L/{m.d_model}d/{m.n_head}h/{m.n_kv_head}kv/T{m.context_length}/"
        f"B{config.train.batch_size}",
        "recipe": f"{config_lib.resolve_optimizer(config).optimizer} lr {config.optim.lr:g} {config.optim.schedule}"
        + (" qk_norm" if m.qk_norm else "")
        + (f" {m.mlp}" if m.mlp != "swiglu" else "")
        + "".join(f" {name}" for name in ablations)
        + f", {dtype_name(dtype)}",
    }


# What each --peer choice trains: {row name: (stream builder, what the recipe column says it reads)}.
PEERS = {"tokens": {"nanogpt-bpe": (token_stream, "bpe")}, "bytes": {"nanogpt-byte": (byte_stream, "bytes")}}
PEERS["both"] = PEERS["tokens"] | PEERS["bytes"]
HEADLINE = "nanogpt-bpe"


# The peer's shape is nanoGPT's own small config (config/train_shakespeare_char.py: 6 layers, 6 heads,
# 384 wide, context 256) at keel's batch of 8, fixed: keel's default may change, the yardstick does not.
PEER_LAYERS, PEER_WIDTH, PEER_HEADS, PEER_CONTEXT, PEER_BATCH = 6, 384, 6, 256, 8


def run_peer(minutes: float, make_stream, reads: str, dtype: torch.dtype | None) -> dict:
    train, val = make_stream(DATA_DIR, "train"), make_stream(DATA_DIR, "val")
    shape = Shape(
        PEER_LAYERS,
        PEER_WIDTH,
        PEER_HEADS,
        PEER_HEADS,
        4 * PEER_WIDTH,
        train.vocab_size,
        PEER_CONTEXT,
        PEER_BATCH,
    )
    r = train_and_evaluate(train, val, minutes, shape, dtype=dtype)
    return {
        "bits_per_byte": r.bits_per_byte,
        "val_loss": r.val_loss,
        "steps": r.steps,
        "tokens": r.tokens,
        "seconds": r.seconds,
        "status": "time_limit",
        "final_loss": r.final_loss,
        "params": r.params,
        "shape": f"{PEER_LAYERS}L/{PEER_WIDTH}d/{PEER_HEADS}h/T{PEER_CONTEXT}/B{PEER_BATCH}",
        "recipe": f"lr 0.001 cosine, {dtype_name(r.dtype)}, {reads} {train.vocab_size}",
    }


def counts(counter: Counter) -> str:
    return ", ".join(f"{name} x{n}" for name, n in counter.most_common()) or "none"


def dtype_name(dtype: object) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[str(dtype).removeprefix("torch.")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--minutes", type=float, default=10.0, help="wall-clock training budget of each trainer (default 10)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: a 1-minute budget")
    parser.add_argument("--only", choices=("keel", "peer"), help="run just keel or just the peer(s)")
    parser.add_argument(
        "--peer",
        choices=tuple(PEERS),
        default="tokens",
        help="which nanoGPT peer: tokens (keel's BPE tokens, the headline; default), bytes, or both",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keel config override, e.g. optim.lr=1e-3 (repeatable)",
    )
    parser.add_argument(
        "--ablate",
        action="append",
        default=[],
        choices=tuple(ABLATIONS),
        help="apply a recipe change of bench/_ablations.py to keel (repeatable)",
    )
    parser.add_argument(
        "--float32",
        action="store_true",
        help="every trainer computes in float32, as on a CPU without native bf16 (at this CPU's float32 speed)",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="keep keel's run directory (DIR/quality: logbook, checkpoints) and registry (DIR/registry.sqlite)",
    )
    args = parser.parse_args()
    if args.keep and args.keep.exists():
        parser.error(f"--keep {args.keep} already exists; name a new directory")
    minutes = 1.0 if args.quick else args.minutes
    if minutes <= 0:
        parser.error(f"--minutes must be positive, got {minutes:g}")

    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    print_machine()
    prepare_data()
    print(
        f"budget: {minutes:g} min of training each, one trainer after the other; "
        "bits per byte on the whole val split\n",
        flush=True,
    )
    overrides = args.overrides + ["train.dtype=float32"] * args.float32
    peer_dtype = torch.float32 if args.float32 else None  # None: keel's rule for this CPU
    runs = {} if args.only == "peer" else {"keel": lambda: run_keel(minutes, overrides, args.ablate, args.keep)}
    if args.only != "keel":
        for name, (make_stream, reads) in PEERS[args.peer].items():
            runs[name] = lambda make_stream=make_stream, reads=reads: run_peer(minutes, make_stream, reads, peer_dtype)
    results = {}
    for name, run in runs.items():
        print(f"training {name} ...", flush=True)
        results[name] = run()
        results[name]["load"] = os.getloadavg()[0]

    header = (
        f"{'trainer':<12} {'shape':<27} {'recipe':<32} {'params':>7} {'steps':>6} {'tokens':>10} "
        f"{'train s':>7} {'tok/s':>6} {'load':>4} {'loss':>6} {'val nats':>8} {'bits/byte':>9}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<12} {r['shape']:<27} {r['recipe']:<32} {r['params'] / 1e6:6.2f}M {r['steps']:>6} "
            f"{r['tokens']:>10,} {r['seconds']:7.0f} {r['tokens'] / r['seconds']:6.0f} {r['load']:4.1f} "
            f"{r['final_loss']:6.3f} {r['val_loss']:8.3f} {r['bits_per_byte']:9.3f}"
        )
    if "keel" in results:
        k = results["keel"]
        print(f"\nkeel stopped by {k['status']}")
        print(f"supervisor repairs: {counts(k['repairs'])}; signals: {counts(k['signals'])}")
        for line in k["told"]:
            print(f"  {line}")
        curve = ", ".join(f"{step} {loss:.3f}" for step, loss in k["val_curve"])
        print(f"keel val nats by step (train.eval_batches batches, equal steps across recipes): {curve}")
    print("load = 1-minute load average when the run ended (2 cores: above ~2 means other work shared them)")
    if "keel" in results:
        for name in (n for n in results if n != "keel"):
            ratio = results["keel"]["bits_per_byte"] / results[name]["bits_per_byte"]
            if name == HEADLINE:  # the same tokens, windows and bytes: the only fair ratio for the target
                verdict = "met" if ratio <= 0.8 else "not met"
                print(f"keel / {name} bits per byte: {ratio:.3f}  (headline; issue 18 target <= 0.8: {verdict})")
            else:
                print(f"keel / {name} bits per byte: {ratio:.3f}")


if __name__ == "__main__":
    main()
