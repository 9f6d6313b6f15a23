"""What a user gets in a fixed time: bits per byte on held-out Python stdlib files, keel against a peer.

Two trainers run one after the other (never together: the machine has 2 cores), each for the
same wall-clock budget on the same train files, and are evaluated on the whole val split:

- keel with its default recipe (`keel.config.load(None, ...)`) and no step limit: train.max_minutes
  ends the run and plans its lr schedule to end with the budget; plus any `--set` overrides;
- a nanoGPT-style byte-level model of the same size (bench/_charpeer.py), computing in the dtype
  keel's `train.dtype=auto` picks on this CPU, as keel does (the first lines name the CPU's class).

Bits per byte divides the total nats on the val split by its UTF-8 bytes, so byte-level and BPE
models compare fairly. The issue's target is keel/peer <= 0.8.

    python bench/quality.py                      # 10 minutes each, ~22 minutes in all
    python bench/quality.py --quick              # 1 minute each, a smoke run
    python bench/quality.py --only keel --minutes 3 --set optim.lr=2e-3 --set optim.schedule=cosine
    python bench/quality.py --only keel --minutes 6 --set train.max_steps=400   # fixed schedule, budget as a cap
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _charpeer import VOCAB_SIZE as PEER_VOCAB_SIZE  # noqa: E402
from _charpeer import train_and_evaluate
from _peers import Shape  # noqa: E402
from throughput import DATA_DIR, prepare_data, print_machine  # noqa: E402


def run_keel(minutes: float, overrides: list[str]) -> dict:
    from keel import config as config_lib
    from keel.inference import evaluate_run, load_run
    from keel.models.gpt import GPT
    from keel.runs.rundir import init_run_dir
    from keel.train.loop import train
    from keel.train.precision import pick_device, pick_dtype

    # A max_steps given with --set fixes the schedule (the budget still caps it), so recipes compare
    # at equal steps on a noisy machine.
    config = config_lib.load(
        None, [f"data.path={DATA_DIR}", "name=quality", "train.max_steps=0", f"train.max_minutes={minutes}"] + overrides
    )
    dtype = pick_dtype(config.train.dtype, pick_device(config.train.device))
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "quality"
        config = init_run_dir(config, run_dir)
        result = train(config, run_dir, registry=None, progress=False)
        evaluation = evaluate_run(load_run(run_dir), DATA_DIR)
    m = config.model
    return {
        "bits_per_byte": evaluation.bits_per_byte,
        "val_loss": evaluation.loss,
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "status": result.status,
        "final_loss": result.final_loss,
        "params": GPT(m).num_params(),
        "shape": f"{m.n_layer}L/{m.d_model}d/{m.n_head}h/{m.n_kv_head}kv/T{m.context_length}/"
        f"B{config.train.batch_size}",
        "recipe": f"lr {config.optim.lr:g} {config.optim.schedule}"
        + (" qk_norm" if m.qk_norm else "")
        + f", {dtype_name(dtype)}",
    }


def run_peer(minutes: float) -> dict:
    from keel import config as config_lib

    # The peer copies the size of keel's default model, whatever --set says about keel.
    m, t = (c := config_lib.load(None, [f"data.path={DATA_DIR}"])).model, c.train
    shape = Shape(
        m.n_layer, m.d_model, m.n_head, m.n_head, 4 * m.d_model, PEER_VOCAB_SIZE, m.context_length, t.batch_size
    )
    r = train_and_evaluate(DATA_DIR, minutes, shape)
    return {
        "bits_per_byte": r.bits_per_byte,
        "val_loss": r.val_loss,
        "steps": r.steps,
        "tokens": r.tokens,
        "seconds": r.seconds,
        "status": "time_limit",
        "final_loss": r.final_loss,
        "params": r.params,
        "shape": f"{m.n_layer}L/{m.d_model}d/{m.n_head}h/T{m.context_length}/B{t.batch_size}",
        "recipe": f"lr 0.001 cosine, {dtype_name(r.dtype)}, bytes",
    }


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
    parser.add_argument("--only", choices=("keel", "peer"), help="run just one of the two")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keel config override, e.g. optim.lr=1e-3 (repeatable)",
    )
    args = parser.parse_args()
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
    results = {}
    for name, run in (("keel", lambda: run_keel(minutes, args.overrides)), ("peer", lambda: run_peer(minutes))):
        if args.only in (None, name):
            print(f"training {name} ...", flush=True)
            results[name] = run()
            results[name]["load"] = os.getloadavg()[0]

    header = (
        f"{'trainer':<8} {'shape':<27} {'recipe':<28} {'params':>7} {'steps':>6} {'tokens':>10} "
        f"{'train s':>7} {'tok/s':>6} {'load':>4} {'loss':>6} {'val nats':>8} {'bits/byte':>9}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<8} {r['shape']:<27} {r['recipe']:<28} {r['params'] / 1e6:6.2f}M {r['steps']:>6} "
            f"{r['tokens']:>10,} {r['seconds']:7.0f} {r['tokens'] / r['seconds']:6.0f} {r['load']:4.1f} "
            f"{r['final_loss']:6.3f} {r['val_loss']:8.3f} {r['bits_per_byte']:9.3f}"
        )
    if "keel" in results:
        k = results["keel"]
        print(f"\nkeel stopped by {k['status']}")
    print("load = 1-minute load average when the run ended (2 cores: above ~2 means other work shared them)")
    if len(results) == 2:
        ratio = results["keel"]["bits_per_byte"] / results["peer"]["bits_per_byte"]
        verdict = "met" if ratio <= 0.8 else "not met"
        print(f"keel / peer bits per byte: {ratio:.3f}  (issue 4 target <= 0.8: {verdict})")


if __name__ == "__main__":
    main()
