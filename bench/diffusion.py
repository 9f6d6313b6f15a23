"""Diffusion on mnist-5k in a fixed time: rectified flow against DDPM, scored by keel's quality yardstick.

For each objective, one after the other (never together: the machine has 2 cores), a DiT with the
recipe `keel demo --diffusion` uses (keel.demo.DIFFUSION_RECIPE) trains on builtin:mnist-5k for the
same wall-clock budget; then its EMA weights draw `--samples` class-conditional images (the classes
in turn) at each sampler step count, and keel.tasks.image_quality scores them beside the reference
rows (held-out real images, blurred real images, class means, noise) on as many images.

The issue's targets, on the flow run: at least 90% of the samples recognised as their class, and a
Fréchet distance under the blurred-real row's. Training speed is printed as images/s of the steps
(evaluations and checkpoints excluded) and as MFU against this machine's GEMM peak in the dtype the
run computes in, counting 6N FLOPs per patch token plus attention (12 L d T), as nanoGPT does.

    python bench/diffusion.py                       # 15 minutes per objective, ~45 minutes in all
    python bench/diffusion.py --minutes 1 --samples 100 --steps 10    # a smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _peers import gemm_gflops  # noqa: E402
from throughput import print_machine  # noqa: E402

DATA = Path("data/mnist-5k")


def train_one(objective: str, minutes: float, run_dir: Path) -> dict:
    from keel import config as config_lib
    from keel.demo import DIFFUSION_RECIPE
    from keel.runs.rundir import init_run_dir
    from keel.train.loop import train
    from keel.train.precision import pick_device, pick_dtype

    config = config_lib.load(
        None,
        [
            f"name=bench-{objective}",
            f"data.path={DATA}",
            *DIFFUSION_RECIPE,
            f"diffusion.objective={objective}",
            "train.max_steps=0",
            f"train.max_minutes={minutes}",
        ],
    )
    config = init_run_dir(config, run_dir)
    result = train(config, run_dir, registry=None, progress=False)
    m = config.model
    step_seconds = sum(result.timings.get(phase, 0.0) for phase in ("data", "forward_backward", "optimizer"))
    images = result.steps * config.train.batch_size
    return {
        "result": result,
        "images_per_s": images / step_seconds,
        "tokens_per_image": result.tokens / images if images else 0,
        "dtype": pick_dtype(config.train.dtype, pick_device(config.train.device)),
        "layers": m.n_layer,
        "width": m.d_model,
        "step_seconds": step_seconds,
    }


def mfu(run: dict, num_params: int) -> float:
    tokens = run["tokens_per_image"]
    flops_per_image = tokens * (6 * num_params + 12 * run["layers"] * run["width"] * tokens)
    return run["images_per_s"] * flops_per_image / (gemm_gflops(run["dtype"]) * 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0, help="training budget per objective")
    parser.add_argument("--objectives", nargs="+", default=["flow", "ddpm"], choices=["flow", "ddpm"])
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 25, 50], help="sampler step counts")
    parser.add_argument("--samples", type=int, default=500, help="images scored per row")
    args = parser.parse_args()
    print("command: python bench/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    print_machine()

    from keel.data import prepare
    from keel.inference import load_diffusion_run, score_diffusion
    from keel.tasks.image_quality import QualityScorer, format_table

    if not (DATA / "manifest.json").is_file():
        prepare(["builtin:mnist-5k"], DATA, progress=False)
    start = time.perf_counter()
    scorer = QualityScorer(DATA)  # trains the yardstick once (cached beside the data)
    seconds = time.perf_counter() - start
    print(f"classifier: {scorer.classifier.val_accuracy:.1%} on held-out real digits ({seconds:.0f} s)")
    reference = scorer.reference_rows(args.samples)

    rows, speed = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for objective in args.objectives:
            run = train_one(objective, args.minutes, Path(tmp) / objective)
            loaded = load_diffusion_run(Path(tmp) / objective)
            result = run["result"]
            speed.append(
                f"{objective}: {result.steps} steps in {args.minutes:g} min, val loss {result.val_loss:.4f}, "
                f"{run['images_per_s']:.1f} images/s in the steps ({run['step_seconds']:.0f} s of them), "
                f"MFU {mfu(run, loaded.model.num_params()):.1%} ({str(run['dtype']).removeprefix('torch.')}, "
                f"{loaded.model.num_params():,} parameters)"
            )
            print(speed[-1], flush=True)
            for steps in args.steps:
                start = time.perf_counter()
                scored, _ = score_diffusion(loaded, args.samples, steps=steps)
                name = f"{objective}, {steps} sampler steps"
                rows[name] = next(iter(scored.values()))
                print(f"  {name}: scored in {time.perf_counter() - start:.0f} s", flush=True)
    print()
    print("\n".join(speed))
    print(format_table({**rows, **reference}, scorer.classifier.val_accuracy))
    blurred = next(row["frechet_distance"] for name, row in reference.items() if name.startswith("blurred"))
    for name, row in rows.items():
        if name.startswith("flow"):
            ok = row["class_accuracy"] >= 0.9 and row["frechet_distance"] < blurred
            print(
                f"target ({name}): class accuracy {row['class_accuracy']:.1%} (>= 90%), FD "
                f"{row['frechet_distance']:.1f} (< blurred {blurred:.1f}): {'met' if ok else 'NOT met'}"
            )


if __name__ == "__main__":
    main()
