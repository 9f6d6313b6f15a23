"""The `keel` command: parse, call one function, print. User mistakes print one sentence, exit 2."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from keel.errors import UserError


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt is for SIGINT, so that cleanup code runs on the way out."""


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt and SIGTERM raises Terminated while the block runs.

    Set explicitly because neither is certain otherwise: SIGTERM kills at once by default,
    skipping every cleanup, and a shell starts background jobs (`keel prepare ... &` in a
    script) with SIGINT ignored, which Python then keeps.
    """

    def terminate(signum: int, frame: object) -> None:
        raise Terminated

    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
        signal.SIGTERM: signal.signal(signal.SIGTERM, terminate),
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def cmd_prepare(args: argparse.Namespace) -> int:
    from keel.data import prepare
    from keel.data.examples import summary

    manifest = prepare(
        args.sources,
        Path(args.out),
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        dedup=args.dedup,
        force=args.force,
        tokenizer=args.tokenizer,
        context_length=args.context_length,
        too_long=args.too_long,
        image_size=args.image_size,
        include=args.include,
    )
    if manifest.get("kind") == "images":
        from keel.data.images import summary as image_summary

        print(image_summary(manifest, args.out))
    else:
        print(summary(manifest, args.out) if "kind" in manifest else format_prepare_summary(manifest, args.out))
    return 0


def format_prepare_summary(manifest: dict, out: str) -> str:
    docs = manifest["documents"]
    lines = [
        f"wrote {out}: vocab {manifest['tokenizer']['vocab_size']}, kept {docs['kept']:,} of {docs['read']:,} documents"
    ]
    for name in ("train", "val"):
        s = manifest["splits"][name]
        lines.append(f"  {name}: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['bytes']:,} bytes")
    for reason, skipped in docs["skipped"].items():
        if skipped["count"]:
            examples = ", ".join(skipped["examples"][:3])
            lines.append(f"  skipped {skipped['count']:,} {reason.replace('_', ' ')}, e.g. {examples}")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from keel import config as config_lib
    from keel.runs.rundir import default_run_dir
    from keel.train.launch import launch

    kind = [f"task.kind={args.task}"] if getattr(args, "task", None) else []
    config = config_lib.load(args.config, kind + args.set)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(config, args.config)
    return launch(config, run_dir, new_data=args.new_data, nproc=args.nproc, write_only=args.write_only)


def cmd_sample(args: argparse.Namespace) -> int:
    from keel.inference import load_run, sample
    from keel.runs.rundir import load_run_config

    if load_run_config(Path(args.run_dir)).task.kind == "diffusion":
        return sample_images_of_run(args)
    diffusion_flags = [("--out", args.out), ("--sampler", args.sampler), ("--steps", args.steps)]
    diffusion_flags += [("--guidance", args.guidance), ("--columns", args.columns)]
    for flag, value in diffusion_flags:
        if value is not None:
            raise UserError(f"{flag} applies to diffusion runs; {args.run_dir} makes text (use --prompt).")
    run = load_run(Path(args.run_dir), int8=args.int8)
    print(sample(run, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None, args.top_p, args.seed))
    return 0


def sample_images_of_run(args: argparse.Namespace) -> int:
    from keel.inference import load_diffusion_run, sample_grid

    if args.prompt or args.int8:
        raise UserError(
            f"{'--prompt' if args.prompt else '--int8'} applies to language models; {args.run_dir} "
            "is a diffusion run (use --out, --sampler, --steps, --guidance, --seed)."
        )
    run = load_diffusion_run(Path(args.run_dir))
    columns = 8 if args.columns is None else args.columns
    path, rows = sample_grid(run, args.out, args.sampler, args.steps, args.guidance, args.seed, columns)
    f = run.config.diffusion
    what = (
        f"{rows} rows (one per class: {', '.join(run.images['class_names'])})"
        if run.images["num_classes"]
        else (f"{rows} rows")
    )
    print(
        f"wrote {path}: {what} x {columns} images from the EMA weights of step {run.step}, "
        f"{args.sampler or f.sampler} sampler, {args.steps or f.sample_steps} steps, guidance "
        f"{f.guidance if args.guidance is None else args.guidance:g}, seed {args.seed}"
    )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from keel.inference import chat_reply, chat_template, load_run

    run = load_run(Path(args.run_dir), int8=args.int8)
    chat_template(run)  # a pretraining run fails now, not after the first message

    def reply(messages: list[dict]) -> str:
        return chat_reply(
            run, messages, args.max_new_tokens, args.temperature, args.top_k or None, args.top_p, args.seed
        )

    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        print(reply([*messages, {"role": "user", "content": args.prompt}]))
        return 0
    prompt = "you> " if sys.stdin.isatty() else ""
    while True:
        try:
            line = input(prompt)
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        answer = reply(messages)
        messages.append({"role": "assistant", "content": answer})
        print(answer, flush=True)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from keel.inference import evaluate_run, load_run
    from keel.runs.rundir import load_run_config

    if load_run_config(Path(args.run_dir)).task.kind == "diffusion":
        from keel.inference import evaluate_diffusion, load_diffusion_run

        if args.data or args.int8:
            raise UserError(
                f"{'--data' if args.data else '--int8'} applies to language models; {args.run_dir} "
                "is a diffusion run, evaluated on its own data's val split."
            )
        if args.samples is not None and args.samples < 0:
            raise UserError(f"--samples must be 0 (val loss only) or a positive count, got {args.samples}.")
        run = load_diffusion_run(Path(args.run_dir))
        numbers = evaluate_diffusion(run)
        print(f"step {run.step}: val loss {numbers['val_loss']:.4f} ({run.config.diffusion.objective}, EMA weights)")
        if args.samples != 0:
            from keel.inference import score_diffusion
            from keel.tasks.image_quality import format_table

            rows, accuracy = score_diffusion(run, args.samples)
            print(format_table(rows, accuracy))
        return 0
    if args.samples is not None:
        raise UserError(f"--samples applies to diffusion runs; {args.run_dir} is a language model.")
    run = load_run(Path(args.run_dir), int8=args.int8)
    if run.config.task.kind not in ("pretrain", "distill"):  # a distilled student is scored as pretraining is
        from keel.inference import evaluate_task

        if args.data:
            raise UserError(
                f"--data applies to pretraining runs; {args.run_dir} is a {run.config.task.kind} run, "
                "evaluated on its own data's val split."
            )
        numbers = evaluate_task(run)
        names = {"val_loss": {"sft": "completion loss", "dpo": "preference loss"}[run.config.task.kind]}
        shown = [f"{names.get(k, k.removeprefix('val_').replace('_', ' '))} {v:.4f}" for k, v in numbers.items()]
        print(f"step {run.step}: " + "  ".join(shown))
        return 0
    r = evaluate_run(run, Path(args.data) if args.data else None)
    print(
        f"step {run.step}: val loss {r.loss:.4f}  perplexity {r.perplexity:.2f}  bits/byte {r.bits_per_byte:.4f}"
        f"  ({r.tokens:,} tokens)"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from keel.export import export_run

    r = export_run(Path(args.run_dir), Path(args.out), args.dtype, args.format, args.int8, args.adapters)
    kind = "GGUF (Q8_0)" if r.int8 else ("GGUF" if r.format == "gguf" else "Hugging Face Llama")
    template = ", chat template included" if r.chat else ""
    print(
        f"wrote {r.out}: {kind}, {r.dtype if not r.int8 else 'int8'} weights of step {r.step}{template} "
        f"({r.num_bytes / 1e6:.1f} MB: {', '.join(r.files)})"
    )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from keel.inference import merge_run

    out = merge_run(Path(args.run_dir), Path(args.out))
    print(f"merged the adapters of {args.run_dir} into {out}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from keel.runs.registry import Registry, format_runs_table

    with Registry() as registry:
        if not args.import_dirs:
            print(format_runs_table(registry.runs()))
            return 0
        from keel.runs.importer import import_run

        for run_dir in args.import_dirs:
            run = import_run(Path(run_dir), registry)
            print(
                f"imported {run.name} from {run_dir}: {run.status} at step {run.step}, "
                f"{len(run.checkpoints)} checkpoints, {len(run.events)} events"
            )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.diffusion:
        from keel.demo import run_diffusion_demo

        if args.full:
            raise UserError("--full goes on from the language-model demo; drop it with --diffusion.")

        run_diffusion_demo(args.minutes if args.minutes is not None else 4.0)
        return 0
    from keel.demo import run_demo

    run_demo(args.minutes if args.minutes is not None else 8.0, args.finetune_minutes, full=args.full)
    return 0


def cmd_logbook(args: argparse.Namespace) -> int:
    from keel.runs.rundir import LOGBOOK_FILE, load_run_config
    from keel.supervisor.logbook import read_logbook, render_chronicle

    load_run_config(Path(args.run_dir))  # a clear error for a path that is not a run
    print(render_chronicle(read_logbook(Path(args.run_dir) / LOGBOOK_FILE)), end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from keel.runs.report import write_report

    print(f"wrote {write_report(Path(args.run_dir))}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from keel.research.sweep import build_spec, counts_line, run_sweep

    spec = build_spec(args.config, args.set, args.param, args.space, args.name, args.out)
    result = run_sweep(spec, args.n_trials, args.sampler, args.seed, args.pruner, args.startup_trials)
    print(f"\n{counts_line(result)}\n{result.table}\nwrote {result.page}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from keel.research.compare import compare_runs

    comparison = compare_runs(args.runs, Path(args.out))
    print(f"{comparison.table}\nwrote {comparison.page}")
    return 0


def cmd_chaos(args: argparse.Namespace) -> int:
    from keel.demo import ensure_data
    from keel.supervisor.chaos import format_scorecard, run_chaos

    data_dir = Path(args.data)
    ensure_data(data_dir)
    results = run_chaos(
        data_dir,
        Path(args.out),
        args.quick,
        args.only,
        report=lambda r: print(f"{r.name}: {'PASS' if r.passed else 'FAIL'}: {r.evidence}", flush=True),
    )
    print("\n" + format_scorecard(results))
    return 0 if all(r.passed for r in results) else 1


def cmd_scale(args: argparse.Namespace) -> int:
    from keel.research.scale import scale

    return scale(
        Path(args.ladder_dir),
        args.depths,
        args.budgets,
        args.aspect,
        args.config,
        args.set,
        args.predict,
        args.bootstrap,
    )


def cmd_config(args: argparse.Namespace) -> int:
    from keel.config import reference

    if not args.markdown:
        for key, default, help_text in reference():
            print(f"{key:28} {default!s:12} {help_text}")
        return 0
    print("""# Config reference

<!-- Generated from the config's help strings; do not edit by hand.
     Regenerate with: .venv/bin/keel config --markdown > docs/config.md -->

A config is a YAML file with the sections below; `--set section.key=value` overrides any key.
Unknown keys are an error that suggests the nearest valid one. The resolved config is saved as
`RUN_DIR/config.yaml`, and each checkpoint's `meta.json` carries it too. `keel config` prints the
same keys as plain text.""")
    for section, doc, rows in reference(sections=True):
        if rows:
            print(f"\n## {section or '(top level)'}\n\n{doc}\n\n| key | default | meaning |\n|---|---|---|")
        for key, default, help_text in rows:
            meaning = help_text.replace("|", "\\|")  # a bare | would end the table cell
            print(f"| `{key}` | `{default!r}` | {meaning} |")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from keel.research.inspect import inspect_run

    text, _, paths = inspect_run(
        Path(args.run_dir), args.cursor, args.prompt, Path(args.out) if args.out else None, args.rows, args.top_k
    )
    print(text)
    print(f"\nwrote {len(paths)} files into {paths[0].parent}: {', '.join(p.name for p in paths)}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from keel import config as config_lib
    from keel.research.doctor import run_doctor, verdict

    config = config_lib.load(args.config, args.set)
    report = run_doctor(config, args.overfit_steps, args.copy_steps, report=lambda line: print(line, flush=True))
    print(verdict(report))
    return 0 if report.passed else 1


INT8_HELP = "run on the CPU with the blocks' linear layers in int8 (dynamic quantization): faster, a little less exact"


def add_config_options(p: argparse.ArgumentParser, what: str = "run config", example: str = "optim.lr=1e-3") -> None:
    """--config FILE and repeatable --set KEY=VALUE, as every command that builds a config takes them."""
    p.add_argument("--config", metavar="FILE", help=f"YAML {what} (defaults apply to keys it leaves out)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help=f"override a config key, e.g. {example}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keel", description="Train transformers end to end, supervised.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="clean, deduplicate and tokenize sources into a data directory")
    p.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="file or directory (.txt .md .rst .py .jsonl .parquet), builtin:python-stdlib, or "
        "hf:NAME[:CONFIG][:SPLIT]; SFT examples or preference pairs: .jsonl files, builtin:stdlib-sft, "
        "builtin:stdlib-pref, or the toy tasks builtin:copy and builtin:reverse; images: a folder of PNG/JPEG "
        "files (a subfolder per class), builtin:digits or builtin:mnist-5k",
    )
    p.add_argument("--out", required=True, metavar="DATA_DIR", help="directory to create")
    p.add_argument(
        "--include",
        action="append",
        metavar="GLOB",
        help="read only the files of folder sources whose names match GLOB, whatever their suffix (repeatable), "
        "e.g. --include '*.py' for a folder of code that also holds data files",
    )
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default 8192)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="share of documents held out (default 0.02; for examples, that of the --tokenizer data)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="RUN_OR_DATA_DIR",
        help="reuse this run's or data directory's tokenizer.json (required for SFT examples and pairs)",
    )
    p.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="SFT/pairs: longest sequence T (default: the --tokenizer run's model.context_length, else 256)",
    )
    p.add_argument(
        "--too-long",
        choices=["truncate", "refuse"],
        default=None,
        help="SFT/pairs: cut the end of a sequence over T + 1 tokens, or refuse it (default truncate)",
    )
    p.add_argument(
        "--dedup", choices=["exact", "minhash", "none"], default="exact", help="duplicate removal (default exact)"
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="N",
        help="images: resize every image to N x N pixels (needed when their sizes differ)",
    )
    p.add_argument("--force", action="store_true", help="replace DATA_DIR if it exists")
    p.set_defaults(func=cmd_prepare)

    for name, task, text in (
        ("train", None, "train a model, resuming if the run directory has checkpoints"),
        ("sft", "sft", "keel train with task.kind=sft: fine-tune --set init.from=RUN on examples"),
        ("dpo", "dpo", "keel train with task.kind=dpo: align --set init.from=RUN on preference pairs"),
        ("distill", "distill", "keel train with task.kind=distill: a student learns from --set distill.teacher=RUN"),
    ):
        p = sub.add_parser(name, help=text)
        add_config_options(p)
        p.add_argument("--run-dir", metavar="DIR", help="run directory (default runs/<name>)")
        p.add_argument(
            "--new-data",
            action="store_true",
            help="resume on other data or another tokenizer on purpose (refused otherwise)",
        )
        p.add_argument(
            "--nproc",
            type=int,
            default=1,
            metavar="N",
            help="train with N processes on this machine (train.parallel=ddp|fsdp decides how they share a step)",
        )
        p.add_argument(
            "--write-only",
            action="store_true",
            help="check the config and write the run directory without training, for torchrun to start its ranks",
        )
        p.set_defaults(func=cmd_train, task=task)

    p = sub.add_parser("sample", help="generate text from a trained run (a diffusion run: a PNG grid of images)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--int8", action="store_true", help=INT8_HELP)
    p.add_argument(
        "--out", default=None, metavar="FILE.png", help="diffusion: where the grid goes (default RUN_DIR/samples/)"
    )
    p.add_argument(
        "--sampler",
        choices=["auto", "euler", "heun", "ddpm", "ddim"],
        default=None,
        help="diffusion: euler | heun (flow), ddpm | ddim (ddpm) (default: the run's diffusion.sampler)",
    )
    p.add_argument("--steps", type=int, default=None, help="diffusion: sampler steps (default diffusion.sample_steps)")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="diffusion: classifier-free guidance scale, 1 = none (default diffusion.guidance)",
    )
    p.add_argument("--columns", type=int, default=None, help="diffusion: images per row of the grid (default 8)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("chat", help="talk to a fine-tuned run through its chat template (an empty line ends)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--system", default=None, help="system turn that starts the conversation")
    p.add_argument("--prompt", default=None, help="answer this one message and exit instead of reading stdin")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="longest reply; the history keeps this much of the context free (default: half of it)",
    )
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--int8", action="store_true", help=INT8_HELP)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "eval", help="validation loss, perplexity and bits per byte of a run (a diffusion run: loss and image quality)"
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data", metavar="DATA_DIR", help="evaluate on this data's val split (default: the run's data)")
    p.add_argument("--int8", action="store_true", help=INT8_HELP)
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="diffusion: images the quality score draws, 0 for the val loss only (default: the val split, at most 500)",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "export", help="write the run's newest good checkpoint as a Hugging Face Llama directory or a GGUF file"
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="directory to write (new, empty, or an earlier keel export)"
    )
    p.add_argument("--format", choices=["hf", "gguf"], default="hf", help="hf (default) or gguf (llama.cpp)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weight dtype")
    p.add_argument("--int8", action="store_true", help="GGUF only: store the weight matrices as Q8_0")
    p.add_argument(
        "--adapters",
        action="store_true",
        help="a LoRA run: its base, with the adapters in PEFT's format in DIR/adapter (default: folded in)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("merge", help="fold a LoRA run's adapters into its base: a plain run directory")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="the new run directory (must not exist, or be empty)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("runs", help="table of runs from the registry")
    p.add_argument(
        "--import",
        dest="import_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="rebuild these runs' rows, checkpoints, events and the metrics a registry outage left in "
        "RUN_DIR/registry-backlog.jsonl, from their directories (after the registry was unusable or replaced)",
    )
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("demo", help="prepare the stdlib corpus, pretrain, sample, evaluate, then SFT and DPO")
    p.add_argument("--minutes", type=float, default=None, help="pretraining time budget (default 8; --diffusion: 4)")
    p.add_argument(
        "--diffusion",
        action="store_true",
        help="instead: train a DiT on builtin:mnist-5k for --minutes and write a grid of generated digits",
    )
    p.add_argument(
        "--finetune-minutes",
        type=float,
        default=2.0,
        help="time for SFT, DPO and (--full) distillation after pretraining (default 2; 0 skips them)",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="go on to distil a half-size student and export the DPO model (HF) and the student (int8 GGUF)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("logbook", help="print the run's logbook as a chronicle with a summary")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=cmd_logbook)

    p = sub.add_parser("report", help="write RUN_DIR/report/index.html: curves, interventions and the logbook")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "sweep", help="search hyperparameters with Optuna: each trial a supervised run, the study resumable"
    )
    add_config_options(p, "base config of every trial", "train.max_steps=500")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=RANGE",
        help="a swept key: log:LOW:HIGH | float:LOW:HIGH | int:LOW:HIGH | choice:A,B,..., e.g. optim.lr=log:1e-4:1e-2",
    )
    p.add_argument("--space", metavar="FILE", help="YAML file of `key: RANGE` lines (--param overrides its keys)")
    p.add_argument(
        "--n-trials",
        type=int,
        default=20,
        help="trials the study should have ended, earlier runs of the command included (default 20)",
    )
    p.add_argument("--name", help="study name; trials are runs NAME-000, NAME-001, ... (default: the config's stem)")
    p.add_argument(
        "--out", metavar="DIR", help="where the trials' run directories and sweep.html go (default runs/NAME)"
    )
    p.add_argument(
        "--sampler", choices=["tpe", "random"], default="tpe", help="how parameters are proposed (default tpe)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    p.add_argument(
        "--pruner",
        choices=["median", "none"],
        default="median",
        help="median: stop a trial whose val loss is above the median of the finished trials at the same step",
    )
    p.add_argument(
        "--startup-trials", type=int, default=5, help="trials that finish before the pruner judges any (default 5)"
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", help="compare runs: loss curves, config differences, final metrics, interventions")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or run names the registry knows)")
    p.add_argument(
        "--out", default="compare.html", metavar="FILE", help="the HTML page to write (default compare.html)"
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "chaos",
        help="break training on purpose (10x and 20x lr, SIGKILL, corrupt checkpoint, NaN, hang) and score the repairs",
    )
    p.add_argument("--quick", action="store_true", help="a smaller model and shorter runs (a few minutes)")
    p.add_argument(
        "--only",
        nargs="+",
        choices=[
            "high_lr_10x",
            "high_lr_20x",
            "sigkill",
            "corrupt_checkpoint",
            "nan",
            "hang",
            "second_trainer",
            "watchdog_sigkill",
            "disk_full",
            "locked_registry",
            "damaged_shard",
        ],
        help="run only these scenarios",
    )
    p.add_argument("--data", default="data/python-stdlib", help="prepared data (prepared from the stdlib if missing)")
    p.add_argument("--out", default="runs/chaos", help="where the scenario runs go")
    p.set_defaults(func=cmd_chaos)

    p = sub.add_parser(
        "inspect",
        help="a language-model run's batch as the model sees it, activations, attention (PNGs), predictions, "
        "and pathologies found",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--cursor", type=int, default=0, help="show the batch of this step's data cursor (default 0, the first)"
    )
    p.add_argument("--rows", type=int, default=4, help="rows of the batch to print (default 4)")
    p.add_argument(
        "--prompt", default=None, help="text to look inside the model on (default: the start of the val split)"
    )
    p.add_argument("--top-k", type=int, default=5, help="predictions listed per position (default 5)")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where the attention maps and inspect.json go (default RUN_DIR/inspect)",
    )
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "doctor",
        help="check a config on fresh models: initial loss, gradients, overfitting one batch, learning builtin:copy",
    )
    add_config_options(p)
    p.add_argument("--overfit-steps", type=int, default=300, help="step budget for overfitting one batch (default 300)")
    p.add_argument("--copy-steps", type=int, default=400, help="step budget for learning builtin:copy (default 400)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser(
        "scale",
        help="train a scaling ladder (model sizes x FLOP budgets), fit L(N, D), predict a larger run and check it",
    )
    p.add_argument("ladder_dir", metavar="LADDER_DIR", help="the ladder's directory: ladder.json, ladder.png, runs/")
    p.add_argument(
        "--depths",
        type=int,
        nargs="+",
        metavar="D",
        help="model sizes: depth d is n_layer d, d_model ASPECT x d, n_head d (at least three; a recorded ladder "
        "gains the new ones)",
    )
    p.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        metavar="C",
        help="training FLOP budgets such as 1e12 3e12; each run trains the steps its budget buys (at least two)",
    )
    p.add_argument("--aspect", type=int, default=None, help="d_model per layer, and head size (default 64)")
    add_config_options(p, "base config of every run (model.n_layer etc. excepted)", "data.path=DIR")
    p.add_argument(
        "--predict",
        type=float,
        default=None,
        metavar="C",
        help="then predict the val loss of a compute-optimal run of C FLOPs (>= 4x the largest budget) from the fit, "
        "train it and report the error",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=200,
        metavar="N",
        help="bootstrap refits behind the 90%% intervals (default 200)",
    )
    p.set_defaults(func=cmd_scale)

    p = sub.add_parser("config", help="list every config key with its default and meaning")
    p.add_argument(
        "--markdown", action="store_true", help="print markdown tables, one per section, as in docs/config.md"
    )
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # Every command stops cleanly on SIGINT or SIGTERM (its `finally` blocks run); `keel train`'s
        # watchdog takes both over while the trainer runs, to pass them on.
        with stop_signals_raise():
            return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as stop:
        # An object the signal caught half-built (a progress bar in its constructor) complains when it is
        # collected on the way out; after a stop that is noise below the one line that matters.
        sys.unraisablehook = lambda unraisable: None
        if isinstance(stop, Terminated):
            print("interrupted (SIGTERM)", file=sys.stderr)
            return 128 + signal.SIGTERM  # 143
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT  # 130, as a shell reports a command ended by SIGINT


if __name__ == "__main__":
    sys.exit(main())
