"""What post-training buys in a fixed time: pretrain, SFT, then DPO on the Python stdlib, held-out numbers per stage.

Three keel runs, one after the other (never together: the machine has 2 cores), each with keel's
defaults (`keel.config.load(None, ...)`) plus any `--set` overrides and a wall-clock budget
(train.max_minutes, no step limit, so the lr schedule is planned to end with the budget):

1. base: pretraining on builtin:python-stdlib (or the run given with --base, reused as it is);
2. sft: task.kind=sft on builtin:stdlib-sft, from the base (prompt = a documented function's
   signature and docstring, completion = its body; loss on the completion and its end token);
3. dpo: task.kind=dpo on builtin:stdlib-pref, from the SFT run, which is also its frozen reference
   (chosen = the real body, rejected = the body with one mechanical corruption).

Both example sets are prepared with the base run's tokenizer and split as its pretraining data was,
so no function the base was validated on is fine-tuned on.

Every stage is scored on its own whole val split before (the init weights) and after (the run's
final checkpoint), with the task's own evaluation: bits per byte on held-out stdlib files (base;
"before" is the random init), completion loss in nats per completion token (sft), and for dpo the
preference loss, reward accuracy (share of val pairs with implied reward margin > 0: exactly 0 for
the init, whose margin is 0), "prefers chosen" (share of val pairs whose chosen response has the
higher summed log-prob: the reference before, the policy after), the mean chosen log-prob, the KL
estimate, and the SFT completion loss of the DPO model (what preference training cost the SFT
objective). Throughput counts the optimizer steps' tokens (base), examples (sft: the examples
packed into the steps' rows) or pairs (dpo) over the training time less evaluation and checkpoints;
DPO's reference pass (log-probs of every train and val sequence under the SFT model) runs before
its budget starts and is timed on its own line.

Samples continue three held-out SFT prompts with the base, SFT and DPO models.

The runs and the prepared data stay in --out (default bench/.cache/finetune/DATE-TIME): `keel sample`,
`keel logbook` and `keel eval` work on them, and --base reuses the base run.

    python bench/finetune.py                         # base 10 + SFT 5 + DPO 5 min: ~25-30 minutes in all
    python bench/finetune.py --base bench/.cache/finetune/20261201-120000/base     # skip pretraining
    python bench/finetune.py --dpo-set optim.lr=1e-4 --beta 0.05
    python bench/finetune.py --quick                 # smoke run: a tiny model, ~3 minutes on an idle machine
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from keel import config as config_lib
from keel.config import RunConfig
from keel.data import prepare
from keel.data.examples import summary
from keel.errors import UserError
from keel.inference import LoadedRun, evaluate_run, load_run, sample
from keel.runs.rundir import TOKENIZER_FILE, init_run_dir, load_run_config
from keel.tasks import build_task
from keel.tasks.dpo import DPOTask
from keel.tasks.lm import sequence_log_probs
from keel.tasks.sft import SFTTask
from keel.train.loop import TrainResult, train
from keel.train.precision import autocast, describe_cpu, pick_device, pick_dtype

sys.path.insert(0, str(Path(__file__).parent))
from throughput import DATA_DIR, prepare_data  # noqa: E402

CACHE = Path(__file__).parent / ".cache"
WHOLE_SPLIT = 1 << 30  # train.eval_batches that covers any val split
NUM_SAMPLES = 3
# --quick: a tiny model and short budgets (the model settings go first, so --set overrides them)
QUICK_MINUTES = {"base": 0.3, "sft": 0.2, "dpo": 0.2}
QUICK_BASE_SETS = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.context_length=128"]
QUICK_SETS = ["train.batch_size=4"]


@dataclass
class Stage:
    """One finished run: what ran, how it ended, how fast, and its held-out rows for the table."""

    name: str
    run_dir: Path
    result: TrainResult | None  # None: a reused base run
    rate: str = ""  # tokens/s, examples/s or pairs/s
    rows: list[tuple[str, float | None, float | None]] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# shared pieces


def device_and_dtype(config: RunConfig) -> tuple[torch.device, torch.dtype]:
    device = pick_device(config.train.device)
    return device, pick_dtype(config.train.dtype, device)


def whole_val(config: RunConfig) -> RunConfig:
    """The same config with evaluations over the whole val split (the training stream is unchanged)."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, eval_batches=WHOLE_SPLIT))


def training_seconds(result: TrainResult) -> float:
    """The run's time less its evaluations and checkpoints (compilation, if any, stays in)."""
    return max(result.seconds - result.timings.get("eval", 0.0) - result.timings.get("checkpoint", 0.0), 1e-9)


def step_rows(config: RunConfig, steps: int) -> int:
    """Micro-batch rows (sequences, or pairs for DPO) of the first `steps` optimizer steps."""
    return steps * config.train.grad_accum * config.train.batch_size


def start_run(sets: list[str], run_dir: Path) -> RunConfig:
    return init_run_dir(config_lib.load(None, sets), run_dir)


def run_training(name: str, config: RunConfig, run_dir: Path) -> TrainResult:
    m, o, t = config.model, config.optim, config.train
    _, dtype = device_and_dtype(config)
    print(
        f"{name}: training {m.n_layer}L/{m.d_model}d/{m.n_head}h T{m.context_length} "
        f"B{t.batch_size}x{t.grad_accum}, lr {o.lr:g} {o.schedule}, {str(dtype).removeprefix('torch.')}, "
        f"{t.max_minutes:g} min in {run_dir} ...",
        flush=True,
    )
    result = train(config, run_dir, registry=None, progress=False)
    print(
        f"{name}: {result.status} after {result.steps} steps, {training_seconds(result):.0f} s of training "
        f"({result.seconds:.0f} s with evaluations and checkpoints), load {os.getloadavg()[0]:.1f}"
        + (f"; {result.diagnosis}" if result.diagnosis else ""),
        flush=True,
    )
    return result


# ---------------------------------------------------------------------------------------------
# the three stages


def pretrain_base(minutes: float, sets: list[str], run_dir: Path) -> Stage:
    prepare_data()
    config = start_run(
        [f"data.path={DATA_DIR.resolve()}", "train.max_steps=0", f"train.max_minutes={minutes}", *sets], run_dir
    )
    device, dtype = device_and_dtype(config)
    initial = build_task(config, device, dtype).build_model()
    tokenizer = Tokenizer.from_file(str(run_dir / TOKENIZER_FILE))
    before = evaluate_run(LoadedRun(config, initial, tokenizer, 0, device, dtype, run_dir))
    del initial
    result = run_training("base", config, run_dir)
    after = evaluate_run(load_run(run_dir))
    return Stage(
        "base",
        run_dir,
        result,
        f"{result.tokens / training_seconds(result):,.0f} tok/s",
        [
            ("val bits/byte (stdlib files)", before.bits_per_byte, after.bits_per_byte),
            ("val loss, nats/token", before.loss, after.loss),
        ],
    )


def reuse_base(run_dir: Path) -> Stage:
    load_run_config(run_dir)  # a clear sentence if it is not a run directory
    print(f"base: reusing {run_dir}", flush=True)
    after = evaluate_run(load_run(run_dir))
    return Stage(
        "base",
        run_dir,
        None,
        "reused",
        [("val bits/byte (stdlib files)", None, after.bits_per_byte), ("val loss, nats/token", None, after.loss)],
    )


def prepare_examples(source: str, base_run: Path, out: Path) -> Path:
    started = time.perf_counter()
    manifest = prepare([source], out, tokenizer=str(base_run), progress=False)
    print(f"prepared {source} in {time.perf_counter() - started:.0f} s\n{summary(manifest, str(out))}", flush=True)
    return out


def fine_tune_sft(base_run: Path, data: Path, minutes: float, sets: list[str], run_dir: Path) -> tuple[Stage, SFTTask]:
    config = start_run(
        [
            f"data.path={data.resolve()}",
            "task.kind=sft",
            f"init.from={base_run.resolve()}",
            "train.max_steps=0",
            f"train.max_minutes={minutes}",
            *sets,
        ],
        run_dir,
    )
    device, dtype = device_and_dtype(config)
    task = build_task(whole_val(config), device, dtype)  # also counts the examples trained on
    before = task.evaluate(task.build_model())["val_loss"]
    result = run_training("sft", config, run_dir)
    after = task.evaluate(load_run(run_dir).model)["val_loss"]
    examples = sum(len(task._row(row)) for row in range(step_rows(config, result.steps)))
    stage = Stage(
        "sft",
        run_dir,
        result,
        f"{examples / training_seconds(result):,.1f} examples/s",
        [("completion loss, nats/token", before, after)],
    )
    return stage, task


def prefers_chosen(task: DPOTask, model: torch.nn.Module) -> float:
    """Share of val pairs whose chosen response has the higher summed log-prob under `model`."""
    num_pairs, rows = len(task.splits["val"]) // 2, task.config.train.batch_size
    wins = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, num_pairs, rows):
            batch = task._rows("val", np.arange(start, min(start + rows, num_pairs))).to(task.device)
            with autocast(task.device, task.dtype):
                log_probs, _ = sequence_log_probs(model, batch.tensors["inputs"], batch.tensors["targets"])  # (2B,)
            chosen, rejected = log_probs.float().chunk(2)
            wins += int((chosen > rejected).sum())
    return wins / num_pairs


def align_dpo(
    sft_run: Path,
    data: Path,
    minutes: float,
    beta: float,
    sets: list[str],
    run_dir: Path,
    sft_task: SFTTask,
    sft_after: float,
) -> Stage:
    config = start_run(
        [
            f"data.path={data.resolve()}",
            "task.kind=dpo",
            f"init.from={sft_run.resolve()}",
            f"dpo.beta={beta}",
            "train.max_steps=0",
            f"train.max_minutes={minutes}",
            *sets,
        ],
        run_dir,
    )
    device, dtype = device_and_dtype(config)
    # Built before training, so the reference pass is done (and cached in the run) outside the budget.
    started = time.perf_counter()
    task = build_task(whole_val(config), device, dtype)
    print(
        f"dpo: reference log-probs of {sum(len(s) for s in task.splits.values()):,} sequences (train and val) "
        f"in {time.perf_counter() - started:.0f} s, before the budget",
        flush=True,
    )
    before = task.evaluate(task.build_model())
    reference = task.reference["val"]  # (num_sequences,): 2i chosen, 2i+1 rejected
    reference_prefers = float(np.mean(reference[0::2] > reference[1::2]))
    result = run_training("dpo", config, run_dir)
    model = load_run(run_dir).model
    after = task.evaluate(model)
    policy_prefers = prefers_chosen(task, model)
    sft_loss_after = sft_task.evaluate(model)["val_loss"]  # the same token ids: both data use the base tokenizer
    pairs = step_rows(config, result.steps)
    return Stage(
        "dpo",
        run_dir,
        result,
        f"{pairs / training_seconds(result):,.1f} pairs/s",
        [
            ("preference loss", before["val_loss"], after["val_loss"]),
            ("reward accuracy (margin > 0)", None, after["val_reward_accuracy"]),
            ("prefers chosen (ref -> policy)", reference_prefers, policy_prefers),
            ("chosen log-prob, nats", before["val_chosen_logp"], after["val_chosen_logp"]),
            ("KL estimate, nats", before["val_kl"], after["val_kl"]),
            ("SFT completion loss", sft_after, sft_loss_after),
        ],
    )


# ---------------------------------------------------------------------------------------------
# output


def print_header() -> None:
    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    print("cpu:", describe_cpu())
    print(f"commit: {commit or 'unknown'}" + (" (with uncommitted changes)" if dirty.stdout.strip() else ""))
    print("date:", time.strftime("%Y-%m-%d %H:%M %Z"))
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}\n",
        flush=True,
    )


def number(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.3f}"


def print_table(stages: list[Stage]) -> None:
    header = f"{'stage':<5} {'held-out metric (whole val split)':<34} {'before':>8} {'after':>8} {'steps':>6}  rate"
    print("\n" + header + "\n" + "-" * (len(header) + 14))
    for stage in stages:
        for i, (metric, before, after) in enumerate(stage.rows):
            steps = str(stage.result.steps) if stage.result and i == 0 else ""
            line = f"{stage.name if i == 0 else '':<5} {metric:<34} {number(before):>8} {number(after):>8} {steps:>6}"
            print(line + (f"  {stage.rate}" if i == 0 else ""))
    print(
        "before = the init weights: random (base), the base (sft), the SFT run = the reference (dpo),\n"
        "  whose reward accuracy is 0 by construction (margin 0)\n"
        "prefers chosen: share of val pairs whose chosen body has the higher summed log-prob\n"
        "SFT completion loss (dpo): the SFT run's before, the DPO run's after\n"
        "rate: over the training time less evaluations and checkpoints"
    )


def sample_prompts(task: SFTTask, count: int) -> list[tuple[str, str]]:
    """(prompt, real completion) of `count` held-out SFT examples spread over the val split whose prompt
    leaves at least half the context for the completion."""
    tokenizer, eot = task.data.tokenizer, task.data.eot_id
    half = task.config.model.context_length // 2
    candidates = []
    for i in range(len(task.val)):
        ids, mask = task.val.get(i)
        first = int(np.argmax(mask == 1))  # the first completion token; ids[0] is <|endoftext|>
        if first <= half:
            candidates.append((ids[1:first], [t for t in ids[first:].tolist() if t != eot]))
    picked = [candidates[k * len(candidates) // count] for k in range(min(count, len(candidates)))]
    return [(tokenizer.decode(prompt.tolist()), tokenizer.decode(completion)) for prompt, completion in picked]


def print_samples(
    prompts: list[tuple[str, str]], runs: dict[str, Path], max_new_tokens: int, temperature: float
) -> None:
    loaded = {name: load_run(run_dir) for name, run_dir in runs.items()}
    print(
        f"\nsamples: {len(prompts)} held-out SFT prompts, {max_new_tokens} new tokens at most, temperature "
        f"{temperature:g}, top-k 50, seed 0"
    )
    for k, (prompt, real) in enumerate(prompts, 1):
        print(f"\n=== prompt {k} ===\n{prompt}\n=== the real body ===\n{real}")
        for name, run in loaded.items():
            text = sample(run, prompt, max_new_tokens, temperature=temperature, top_k=50, seed=0)
            print(f"=== {name} ===\n{text.removeprefix(prompt) if text.startswith(prompt) else text}")


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, help="reuse this pretrained run instead of pretraining one")
    parser.add_argument("--base-minutes", type=float, help="pretraining budget (default 10; --quick 0.3)")
    parser.add_argument("--sft-minutes", type=float, help="SFT budget (default 5; --quick 0.2)")
    parser.add_argument("--dpo-minutes", type=float, help="DPO budget (default 5; --quick 0.2)")
    parser.add_argument("--beta", type=float, default=0.1, help="dpo.beta (default 0.1)")
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run: {' '.join(QUICK_BASE_SETS + QUICK_SETS)} and short budgets"
    )
    parser.add_argument("--out", type=Path, help="where the runs and data go (default bench/.cache/finetune/DATE-TIME)")
    parser.add_argument("--sample-tokens", type=int, default=128, help="new tokens per sample at most (default 128)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keel config override for every stage, model.* for the base only (repeatable)",
    )
    for stage in ("base", "sft", "dpo"):
        parser.add_argument(
            f"--{stage}-set",
            dest=f"{stage}_overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"keel config override for the {stage} run only (repeatable)",
        )
    args = parser.parse_args()
    minutes = {}
    for stage, default in (("base", 10.0), ("sft", 5.0), ("dpo", 5.0)):
        given = getattr(args, f"{stage}_minutes")
        minutes[stage] = given if given is not None else QUICK_MINUTES[stage] if args.quick else default
        if minutes[stage] <= 0:
            parser.error(f"--{stage}-minutes must be positive, got {minutes[stage]:g}")
    out = args.out or CACHE / "finetune" / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty; runs there would be resumed, not trained anew: pick a new directory")

    common = (QUICK_SETS if args.quick else []) + args.overrides
    # model.* keys shape the base; the fine-tuning runs take the shape from their init run.
    tuning = [s for s in common if not s.startswith("model.")]
    print_header()
    started = time.perf_counter()
    try:
        if args.base:
            base = reuse_base(args.base)
        else:
            base = pretrain_base(
                minutes["base"], (QUICK_BASE_SETS if args.quick else []) + common + args.base_overrides, out / "base"
            )
        sft_data = prepare_examples("builtin:stdlib-sft", base.run_dir, out / "stdlib-sft")
        pref_data = prepare_examples("builtin:stdlib-pref", base.run_dir, out / "stdlib-pref")
        sft, sft_task = fine_tune_sft(base.run_dir, sft_data, minutes["sft"], tuning + args.sft_overrides, out / "sft")
        dpo = align_dpo(
            sft.run_dir,
            pref_data,
            minutes["dpo"],
            args.beta,
            tuning + args.dpo_overrides,
            out / "dpo",
            sft_task,
            sft.rows[0][2],
        )
        print_table([base, sft, dpo])
        print_samples(
            sample_prompts(sft_task, NUM_SAMPLES),
            {"base": base.run_dir, "sft": sft.run_dir, "dpo": dpo.run_dir},
            args.sample_tokens,
            args.temperature,
        )
    except UserError as err:
        sys.exit(f"error: {err}")
    print(f"\nwall time: {(time.perf_counter() - started) / 60:.1f} min in all")
    print(f"runs and data kept in {out} (keel sample / logbook / eval work on them; delete it when done)")


if __name__ == "__main__":
    main()
