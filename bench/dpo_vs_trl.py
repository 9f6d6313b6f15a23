"""DPO in keel against TRL's DPOTrainer: the same model, pairs, order and hyperparameters, on this machine.

1. A small keel base model pretrained on builtin:python-stdlib (or the run given with --init), and
   builtin:stdlib-pref prepared with its tokenizer (the base vocabulary plus the 4 chat markers).
2. keel: `task.kind=dpo` from that run, through keel's own loop (supervisor on, keel's defaults
   for everything the bench does not set).
3. TRL: `DPOTrainer` on the same weights mapped to Hugging Face LlamaForCausalLM (keel.models.hf; the
   rows of the chat markers start at the mean of the other embedding rows, as keel starts them),
   fed the token ids of keel's data files, so both train on identical tokens, in keel's order.

Both train with the same beta, sigmoid loss (hard labels), learning rate and schedule, AdamW
settings, clipping, batch and steps, with the reference log-probs computed once before training,
in the dtype keel's `train.dtype=auto` picks on this CPU (bf16 only where it is native). The
settings block of the output states what could not be matched.

Held-out reward accuracy is the share of val pairs with an implied reward margin
beta*[(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))] > 0, log-probs summed over the response
tokens. Each implementation reports its own (keel's evaluation; TRL's `evaluate()`), and this
script scores both trained models the same way from their Hugging Face form, as a cross-check that
the numbers mean the same thing. pairs/s counts the pairs of the optimizer steps over the training
time (keel: the loop less its final evaluation and checkpoint; TRL: `train()`); "setup" is model
building, data and the reference pass; "wall" is everything, evaluation included.

Each implementation runs in a fresh subprocess of this script (keel's trainer changes how the
process allocates memory, and peak RSS cannot be reset). Both reference passes score every pair,
about 4,100 train and 25 val at context 256, before the first step; with a tiny model they take
most of a smoke run's time.

    python bench/dpo_vs_trl.py                                # base 4x256 for 5 min, then 200 DPO steps each
    python bench/dpo_vs_trl.py --init runs/small --steps 500  # DPO from an existing keel run
    python bench/dpo_vs_trl.py --layers 2 --width 64 --base-steps 30 --steps 10   # smoke run
    python bench/dpo_vs_trl.py --set train.compile=true       # keel config overrides (TRL mirrors optim.*)

Needs the `bench` extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from keel import config as config_lib
from keel.data import open_examples, prepare
from keel.data.examples import ExampleData, Sequences
from keel.data.tokenizer import EOT, TOKENIZER_FILE
from keel.models.gpt import GPT
from keel.models.hf import llama_config, to_llama_state_dict
from keel.runs.rundir import init_run_dir, load_run_config
from keel.tasks.dpo import PAD_MULTIPLE
from keel.train import checkpoint as ckpt
from keel.train.loop import should_compile, train
from keel.train.optim import lr_at
from keel.train.precision import autocast, describe_cpu, pick_device, pick_dtype

CACHE = Path(__file__).parent / ".cache"
TEXT_DIR = CACHE / "python-stdlib-8192"  # shared with bench/throughput.py
WORK_DIR = CACHE / "dpo_vs_trl"
VOCAB_SIZE = 8192
IMPLS = ("keel", "trl")
SCORE_ROWS = 16  # sequences per forward pass when this script scores a model


# ---------------------------------------------------------------------------------------------
# the base model and the pairs


def train_base(args: argparse.Namespace) -> Path:
    """Pretrain a small keel model on the standard library; its run directory."""
    if not (TEXT_DIR / "manifest.json").exists():
        print(f"preparing {TEXT_DIR} (once) ...", flush=True)
        prepare(["builtin:python-stdlib"], TEXT_DIR, vocab_size=VOCAB_SIZE, progress=False)
    heads = args.heads or max(1, args.width // 64)
    length = (
        [f"train.max_steps={args.base_steps}"]
        if args.base_steps
        else ["train.max_steps=0", f"train.max_minutes={args.base_minutes}"]
    )
    sets = [
        f"data.path={TEXT_DIR.resolve()}",
        f"model.n_layer={args.layers}",
        f"model.d_model={args.width}",
        f"model.n_head={heads}",
        f"model.context_length={args.context}",
        *length,
    ]
    run_dir = WORK_DIR / time.strftime(f"base-{args.layers}x{args.width}-%Y%m%d-%H%M%S")
    how_long = f"{args.base_steps} steps" if args.base_steps else f"{args.base_minutes:g} minutes"
    print(
        f"pretraining the base model ({args.layers} layers x {args.width} wide, {heads} heads, context "
        f"{args.context}) for {how_long} in {run_dir} ...",
        flush=True,
    )
    config = init_run_dir(config_lib.load(None, sets), run_dir)
    result = train(config, run_dir, registry=None, progress=False)
    if result.status not in ("finished", "time_limit"):
        sys.exit(f"the base run stopped early ({result.status}: {result.diagnosis}); see keel logbook {run_dir}")
    return run_dir


def prepare_pairs(init_run: Path) -> Path:
    """builtin:stdlib-pref with the init run's tokenizer and context, prepared once per init run."""
    key = hashlib.sha256(str(init_run.resolve()).encode()).hexdigest()[:8]  # runs of one name in other places
    out = WORK_DIR / f"pref-{init_run.name}-{key}"
    if (out / "manifest.json").is_file():
        return out
    print(f"preparing builtin:stdlib-pref with the tokenizer of {init_run} into {out} ...", flush=True)
    prepare(["builtin:stdlib-pref"], out, tokenizer=str(init_run.resolve()), progress=False)
    return out


# ---------------------------------------------------------------------------------------------
# the settings both implementations share


def keel_sets(job: dict) -> list[str]:
    """keel's config overrides for the DPO run: the bench's settings, then the user's --set."""
    s = job["settings"]
    return [
        "task.kind=dpo",
        f"data.path={job['pref']}",
        f"init.from={job['init']}",
        f"dpo.beta={s['beta']}",
        "dpo.loss=sigmoid",
        "dpo.soft_labels=false",  # TRL's sigmoid loss has no per-pair soft target
        f"optim.lr={s['lr']}",
        f"optim.warmup_steps={s['warmup_steps']}",
        f"optim.weight_decay={s['weight_decay']}",
        f"train.batch_size={s['batch_size']}",
        f"train.grad_accum={s['grad_accum']}",
        f"train.max_steps={s['steps']}",
        "train.max_minutes=0",
        f"train.seed={s['seed']}",
        # one evaluation and one checkpoint, at the end; the evaluation covers every val pair
        f"train.eval_every={s['steps']}",
        f"train.checkpoint_every={s['steps']}",
        f"train.eval_batches={math.ceil(s['val_pairs'] / s['batch_size'])}",
    ] + job["overrides"]


def hf_schedule(optim: config_lib.OptimConfig, steps: int) -> tuple[str, dict]:
    """The transformers lr_scheduler_type and kwargs closest to keel's schedule for a run of `steps`."""
    if optim.schedule == "wsd":
        decay_steps = max(1, int(optim.decay_fraction * steps))  # as keel.train.optim.lr_at counts them
        return "warmup_stable_decay", {
            "num_decay_steps": decay_steps,
            "min_lr_ratio": optim.min_lr_ratio,
            "decay_type": "linear",
        }
    if optim.schedule == "cosine":
        return "cosine_with_min_lr", {"min_lr_rate": optim.min_lr_ratio}
    return ("constant_with_warmup" if optim.warmup_steps else "constant"), {}


def schedule_difference(optim: config_lib.OptimConfig, steps: int) -> float:
    """The largest gap between keel's lr and transformers' over the run, as a fraction of the peak."""
    from transformers import get_scheduler

    name, kwargs = hf_schedule(optim, steps)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=optim.lr)
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=steps, scheduler_specific_kwargs=kwargs
    )
    gap = 0.0
    for step in range(steps):
        gap = max(gap, abs(scheduler.get_last_lr()[0] - lr_at(step, optim, steps)) / optim.lr)
        optimizer.step()
        scheduler.step()
    return gap


# ---------------------------------------------------------------------------------------------
# the pairs as token ids


def split_pair(sequences: Sequences, pair: int) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen response, rejected response) token ids of a pair, from its two keel sequences."""
    chosen, chosen_mask = sequences.get(2 * pair)
    rejected, rejected_mask = sequences.get(2 * pair + 1)
    start = int(np.argmax(chosen_mask))  # the mask is 0 on the prompt, then 1 on the response and its end token
    assert chosen_mask[start:].all() and not chosen_mask[:start].any(), f"pair {pair}: the response is not a suffix"
    assert int(np.argmax(rejected_mask)) == start and rejected_mask[start:].all(), f"pair {pair}: prompts differ"
    assert np.array_equal(chosen[:start], rejected[:start]), f"pair {pair}: prompts differ"
    return chosen[:start].tolist(), chosen[start:].tolist(), rejected[start:].tolist()


def pair_columns(sequences: Sequences, pairs: np.ndarray) -> dict[str, list[list[int]]]:
    """The columns TRL's preference collator reads, one row per entry of `pairs`."""
    split = {int(i): split_pair(sequences, int(i)) for i in np.unique(pairs)}
    rows = [split[int(i)] for i in pairs]
    return {
        "prompt_ids": [r[0] for r in rows],
        "chosen_ids": [r[1] for r in rows],
        "rejected_ids": [r[2] for r in rows],
    }


def keel_pair_order(num_trained: int, num_pairs: int, seed: int) -> np.ndarray:
    """keel's DPO training stream, in the order keel trains on it, for the whole epochs that hold the first
    `num_trained` pairs: TRL is given every pair (its reference pass then covers them all, as keel's does)
    and, reading them in this order, trains on the same pairs as keel, step by step."""
    from keel.tasks.dpo import _pairs_at  # keel's own stream, so that TRL cannot drift from it

    num_epochs = math.ceil(num_trained / num_pairs)
    return _pairs_at(np.arange(num_epochs * num_pairs), num_pairs, seed)


def eval_batch_size(num_pairs: int, batch_size: int) -> int:
    """The largest divisor of `num_pairs` up to max(64, batch_size): TRL's evaluate() averages the means of
    its batches, which equals the mean over the pairs only when the batches are equal."""
    return max(d for d in range(1, max(64, batch_size) + 1) if num_pairs % d == 0)


# ---------------------------------------------------------------------------------------------
# Hugging Face models and the shared scoring


def llama_from_gpt(model: GPT):
    """LlamaForCausalLM with the weights of a keel GPT (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(**llama_config(model.config)))
    result = llama.load_state_dict(to_llama_state_dict(model), strict=False)
    tied = ["lm_head.weight"] if model.config.tie_embeddings else []
    assert result.missing_keys == tied and not result.unexpected_keys, result
    return llama


def llama_from_init(init_run: Path, vocab_size: int):
    """The init run's best checkpoint as keel's DPO starts from it (vocabulary grown to the pairs'), in HF form."""
    from keel.tasks.lm import load_init_weights

    model = GPT(dataclasses.replace(load_run_config(init_run).model, vocab_size=vocab_size))
    load_init_weights(model, init_run)
    return llama_from_gpt(model)


def llama_from_keel_run(run_dir: Path):
    """The last checkpoint of a keel run, in HF form."""
    model = GPT(load_run_config(run_dir).model)
    ckpt.load_checkpoint(ckpt.list_checkpoints(run_dir)[-1], model)
    return llama_from_gpt(model)


def response_log_probs(model, sequences: Sequences, ids: np.ndarray, pad_id: int, dtype: torch.dtype) -> np.ndarray:
    """Summed log-probs of the response tokens (mask 1) of each sequence in `ids`, under an HF causal LM."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(ids), SCORE_ROWS):
            rows = [sequences.get(int(i)) for i in ids[start : start + SCORE_ROWS]]
            length = max(len(seq) for seq, _ in rows)
            inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
            attention = torch.zeros((len(rows), length), dtype=torch.long)
            targets = torch.full((len(rows), length - 1), -100, dtype=torch.long)
            for r, (seq, mask) in enumerate(rows):
                seq = seq.astype(np.int64)  # stored as uint16 or uint32
                inputs[r, : len(seq)] = torch.from_numpy(seq)
                attention[r, : len(seq)] = 1
                targets[r, : len(seq) - 1] = torch.from_numpy(np.where(mask[1:] == 1, seq[1:], -100))
            with autocast(torch.device("cpu"), dtype):
                logits = model(input_ids=inputs, attention_mask=attention, use_cache=False).logits[:, :-1]
            log_probs = torch.log_softmax(logits.float(), dim=-1)  # (rows, T, V)
            picked = log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
            out.append(torch.where(targets != -100, picked, 0.0).sum(-1).double())
    return torch.cat(out).numpy()


def score_pairs(log_probs: np.ndarray, reference: np.ndarray, beta: float) -> dict[str, float]:
    """keel's definitions over pairs (chosen, rejected) = sequences (2i, 2i+1): reward accuracy, margin, kl."""
    ratio = log_probs - reference
    chosen, rejected = ratio[0::2], ratio[1::2]
    h = chosen - rejected
    return {
        "reward_accuracy": float((h > 0).mean()),
        "margin": float((beta * h).mean()),
        "kl": float(((chosen + rejected) / 2).mean()),
    }


# ---------------------------------------------------------------------------------------------
# one implementation, in its own process


def measure_keel(job: dict) -> dict:
    start = time.perf_counter()
    run_dir = Path(job["out"]) / "keel-run"
    config = init_run_dir(config_lib.load(None, keel_sets(job)), run_dir)
    result = train(config, run_dir, registry=None, progress=False)
    wall = time.perf_counter() - start
    if result.status != "finished":
        sys.exit(
            f"keel stopped before its last step ({result.status}: {result.diagnosis}); see {run_dir}/logbook.jsonl"
        )
    timings = result.timings
    train_seconds = result.seconds - timings.get("eval", 0.0) - timings.get("checkpoint", 0.0)
    evaluation = result.evaluation
    return {
        "steps": result.steps,
        "train_seconds": train_seconds,
        "setup_seconds": wall - result.seconds,
        "eval_seconds": timings.get("eval", 0.0),
        "wall_seconds": wall,
        "reward_accuracy": evaluation["val_reward_accuracy"],
        "margin": evaluation["val_margin"],
        "kl": evaluation.get("val_kl", math.nan),
        "run_dir": str(run_dir),
    }


def measure_trl(job: dict) -> dict:
    os.environ["TQDM_DISABLE"] = "1"  # TRL's reference pass shows a bar otherwise
    import datasets
    import transformers
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on rows that already hold prompt_ids / chosen_ids / rejected_ids.

        TRL tokenizes text itself (prompt, prompt + chosen, prompt + rejected, each whole, and an EOS
        appended to each response), which can merge tokens across the prompt/response boundary and
        would not reproduce keel's sequences; its collator, reference pass and loss take token ids, so
        the rows are handed to them as they are.
        """

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    s, optim = job["settings"], config_lib.OptimConfig(**job["optim"])
    dtype = getattr(torch, job["dtype"])
    start = time.perf_counter()
    data = open_examples(Path(job["pref"]), kind="pref")
    num_trained = s["steps"] * s["grad_accum"] * s["batch_size"]
    train_pairs = keel_pair_order(num_trained, len(data.sequences("train")) // 2, s["seed"])
    train_rows = datasets.Dataset.from_dict(pair_columns(data.sequences("train"), train_pairs))
    val_rows = datasets.Dataset.from_dict(pair_columns(data.sequences("val"), np.arange(s["val_pairs"])))
    model = llama_from_init(Path(job["init"]), data.vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(Path(job["pref"]) / TOKENIZER_FILE), eos_token=EOT, pad_token=EOT
    )
    schedule, schedule_kwargs = hf_schedule(optim, s["steps"])
    args = DPOConfig(
        output_dir=str(Path(job["out"]) / "trl"),
        seed=s["seed"],
        data_seed=s["seed"],
        max_steps=s["steps"],
        per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=s["grad_accum"],
        per_device_eval_batch_size=eval_batch_size(s["val_pairs"], s["batch_size"]),
        train_sampling_strategy="sequential",  # the rows are in keel's order already
        learning_rate=s["lr"],
        lr_scheduler_type=schedule,
        lr_scheduler_kwargs=schedule_kwargs,
        warmup_steps=optim.warmup_steps,
        optim="adamw_torch_fused",
        weight_decay=optim.weight_decay,
        adam_beta1=optim.beta1,
        adam_beta2=optim.beta2,
        adam_epsilon=optim.eps,
        max_grad_norm=optim.grad_clip,
        beta=s["beta"],
        loss_type=["sigmoid"],
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=s["batch_size"],
        max_length=None,  # keel's sequences already fit the context
        gradient_checkpointing=False,  # TRL turns it on by default; keel's default is off
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=job["device"] == "cpu",
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=job["log_every"],
        disable_tqdm=True,
    )
    trainer = PretokenizedDPOTrainer(
        model=model, args=args, train_dataset=train_rows, eval_dataset=val_rows, processing_class=tokenizer
    )
    setup = time.perf_counter() - start
    t0 = time.perf_counter()
    output = trainer.train()
    train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = trainer.evaluate()
    eval_seconds = time.perf_counter() - t0
    wall = time.perf_counter() - start
    weights = Path(job["out"]) / "trl-model.safetensors"
    safetensors.torch.save_model(trainer.model, str(weights))
    return {
        "steps": output.global_step,
        "train_seconds": train_seconds,
        "setup_seconds": setup,
        "eval_seconds": eval_seconds,
        "wall_seconds": wall,
        "reward_accuracy": metrics["eval_rewards/accuracies"],
        "margin": metrics["eval_rewards/margins"],
        # TRL's rewards are beta * log pi/ref of each response; keel's kl is the mean log pi/ref
        "kl": (metrics["eval_rewards/chosen"] + metrics["eval_rewards/rejected"]) / (2 * s["beta"]),
        "weights": str(weights),
    }


def worker(job: dict) -> None:
    """Run one implementation and print its figures as the last line of stdout, with the peak RSS."""
    result = measure_keel(job) if job["impl"] == "keel" else measure_trl(job)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps(result))


def run_job(job: dict) -> dict:
    print(f"running {job['impl']} ...", end=" ", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{job['impl']} failed:\n{proc.stderr[-4000:]}")
    print(f"{time.perf_counter() - start:.0f} s", flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# the report


def describe_pairs(data: ExampleData, init_vocab: int) -> str:
    train_pairs, val_pairs = (len(data.sequences(split)) // 2 for split in ("train", "val"))
    soft = sum(int((data.p_chosen(split) != 1).sum()) for split in ("train", "val"))
    labels = "every p_chosen = 1" if soft == 0 else f"{soft} pairs with p_chosen < 1, trained as hard labels by both"
    context = data.manifest["options"]["context_length"]
    return (
        f"pairs: {data.path}: {train_pairs:,} train / {val_pairs:,} val ({labels}); vocabulary {data.vocab_size} "
        f"(base {init_vocab} + {data.vocab_size - init_vocab} chat markers), context {context}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    base = parser.add_argument_group("base model (ignored with --init)")
    base.add_argument("--init", type=Path, help="a finished keel run to start DPO from, instead of pretraining one")
    base.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    base.add_argument("--width", type=int, default=256, help="d_model (default 256)")
    base.add_argument("--heads", type=int, default=0, help="attention heads (default width / 64)")
    base.add_argument("--context", type=int, default=256, help="context length, also of the pairs (default 256)")
    base.add_argument("--base-minutes", type=float, default=5.0, help="pretraining time (default 5)")
    base.add_argument("--base-steps", type=int, default=0, help="pretrain this many steps instead of --base-minutes")
    dpo = parser.add_argument_group("DPO, the same for both")
    dpo.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    dpo.add_argument("--batch-size", type=int, default=8, help="pairs per micro-batch (default 8)")
    dpo.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    dpo.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    dpo.add_argument("--beta", type=float, default=0.1, help="DPO beta (default 0.1)")
    dpo.add_argument(
        "--warmup-steps",
        type=int,
        default=0,
        help="linear warmup steps (default 0: keel's and transformers' warmups differ slightly)",
    )
    dpo.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="AdamW weight decay (default 0; when > 0 TRL also decays the embedding, keel does not)",
    )
    dpo.add_argument("--seed", type=int, default=1337, help="data order and initialisation seed (default 1337)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated among {', '.join(IMPLS)}")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keel config override for the DPO run (repeatable); TRL mirrors the optim.* keys",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one implementation in a child process
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    impls = args.impls.split(",")
    if unknown := set(impls) - set(IMPLS):
        parser.error(f"unknown implementation {', '.join(sorted(unknown))}; choose among {', '.join(IMPLS)}")
    if min(args.steps, args.batch_size, args.grad_accum) < 1:
        parser.error("--steps, --batch-size and --grad-accum must be at least 1")
    if args.init is not None and not (args.init / "config.yaml").is_file():
        parser.error(f"--init {args.init} is not a keel run directory (no config.yaml)")

    import transformers

    trl_version = "not installed"
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        if "trl" in impls:
            parser.error("TRL is not installed; install the bench extra: pip install -e '.[bench]'")

    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    print("cpu:", describe_cpu())
    load_average = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, trl {trl_version}, load average {load_average}"
    )
    started = time.perf_counter()

    WORK_DIR.mkdir(parents=True, exist_ok=True)
    init_run = (args.init or train_base(args)).resolve()
    init_config = load_run_config(init_run)
    m = init_config.model
    print(
        f"base: {init_run} ({m.n_layer} layers x {m.d_model} wide, {m.n_head} heads, context {m.context_length}, "
        f"best checkpoint {ckpt.find_best(init_run).name}); reuse it with --init {init_run}"
    )
    pref_dir = prepare_pairs(init_run)
    data = open_examples(pref_dir, kind="pref")
    print(describe_pairs(data, m.vocab_size))
    if len(data.sequences("val")) == 0:
        sys.exit(f"{pref_dir} has no val pairs to score; use a base run with a longer context")

    settings = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "lr": args.lr,
        "beta": args.beta,
        "warmup_steps": args.warmup_steps,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "val_pairs": len(data.sequences("val")) // 2,
    }
    with tempfile.TemporaryDirectory(prefix="dpo-vs-trl-", dir=WORK_DIR) as out:
        job = {
            "init": str(init_run),
            "pref": str(pref_dir),
            "out": out,
            "settings": settings,
            "overrides": args.overrides,
        }
        config = config_lib.load(None, keel_sets(job))  # the keel run's settings; TRL takes its own from them
        if config.optim.optimizer != "adamw":
            parser.error(f"optim.optimizer={config.optim.optimizer} has no TRL counterpart; keep adamw")
        device = pick_device(config.train.device)
        dtype = pick_dtype(config.train.dtype, device)
        job |= {
            "optim": dataclasses.asdict(config.optim),
            "dtype": str(dtype).removeprefix("torch."),
            "device": device.type,
            "log_every": config.train.log_every,
        }
        o, t = config.optim, config.train
        schedule, schedule_kwargs = hf_schedule(o, args.steps)
        print(
            f"\nsettings, both: beta {args.beta}, sigmoid loss with hard labels, lr {args.lr:g}, {o.schedule} "
            f"schedule (warmup {o.warmup_steps}, decay fraction {o.decay_fraction}, floor {o.min_lr_ratio} x lr), "
            f"AdamW (fused) betas ({o.beta1}, {o.beta2}) eps {o.eps:g} weight decay {o.weight_decay}, clip "
            f"{o.grad_clip}, {args.batch_size} pairs x {args.grad_accum} micro-batches per step, {args.steps} "
            f"steps, seed {args.seed}, the same pairs in keel's order, reference log-probs computed once before "
            f"training, compute dtype {job['dtype']} on {device.type}"
        )
        gap = schedule_difference(o, args.steps)
        print(
            f"  lr schedule: keel {o.schedule} vs transformers {schedule} {schedule_kwargs}: "
            + (
                "identical at every step"
                if gap < 1e-9
                else f"differ by up to {100 * gap:.1f}% of the peak "
                "(the warmup: transformers starts at floor x lr and reaches the peak one step later)"
            )
        )
        print(
            f"  keel: its own loop, supervisor {'on' if config.supervisor.enabled else 'off'}, "
            f"{'compiled' if should_compile(t, 0, device) else 'not compiled (train.compile=auto: too few steps)'}, "
            f"batches right-padded to their longest pair (a multiple of {PAD_MULTIPLE}), evaluation over all "
            f"{settings['val_pairs']} val pairs" + (f", --set {' '.join(args.overrides)}" if args.overrides else "")
        )
        print(
            "  trl: DPOTrainer on keel's token ids (its text tokenization step bypassed), gradient checkpointing "
            "off (TRL's default is on), not compiled, batches padded to their longest pair"
            + (", weight decay on the embedding too (keel: not)" if o.weight_decay else "")
            + ", every train pair in its dataset (in keel's order; steps past one epoch repeat rows, whose "
            f"reference log-probs it then computes again), evaluate() over all val pairs in batches of "
            f"{eval_batch_size(settings['val_pairs'], args.batch_size)}"
        )
        print()

        results = {impl: run_job(job | {"impl": impl}) for impl in impls}

        print("scoring the trained models from their Hugging Face form ...", flush=True)
        score_dtype = dtype if device.type == "cpu" else torch.float32  # the scoring runs on the CPU
        val = data.sequences("val")
        val_ids = np.arange(2 * settings["val_pairs"])

        def score(model) -> np.ndarray:
            return response_log_probs(model, val, val_ids, data.eot_id, score_dtype)

        reference = score(llama_from_init(init_run, data.vocab_size))
        scored = {}
        if "keel" in results:
            scored["keel"] = score_pairs(
                score(llama_from_keel_run(Path(results["keel"]["run_dir"]))), reference, args.beta
            )
        if "trl" in results:
            trl_model = llama_from_init(init_run, data.vocab_size)
            safetensors.torch.load_model(trl_model, results["trl"]["weights"])
            scored["trl"] = score_pairs(score(trl_model), reference, args.beta)

    pairs_per_step = args.batch_size * args.grad_accum
    header = (
        f"{'implementation':<15} {'steps':>5} {'pairs/s':>8} {'train s':>8} {'setup s':>8} {'wall s':>7} "
        f"{'RSS MiB':>8} {'val reward acc':>14} {'val margin':>10} {'val kl':>8}"
    )
    print("\n" + header)
    print("-" * len(header))
    for impl, r in results.items():
        r["pairs_per_s"] = r["steps"] * pairs_per_step / r["train_seconds"]
        print(
            f"{impl:<15} {r['steps']:>5} {r['pairs_per_s']:8.2f} {r['train_seconds']:8.1f} {r['setup_seconds']:8.1f} "
            f"{r['wall_seconds']:7.1f} {r['peak_rss_mib']:8.0f} {r['reward_accuracy']:14.3f} {r['margin']:10.4f} "
            f"{r['kl']:8.3f}"
        )
    print(
        f"\nscored by this script, the same way for both (all {settings['val_pairs']} val pairs, HF Llama form, "
        "reference = the init run in HF form):"
    )
    for impl, s in scored.items():
        print(
            f"{impl:<15} {'':>5} {'':>8} {'':>8} {'':>8} {'':>7} {'':>8} {s['reward_accuracy']:14.3f} "
            f"{s['margin']:10.4f} {s['kl']:8.3f}"
        )
    if len(results) == 2:
        ratio = results["keel"]["pairs_per_s"] / results["trl"]["pairs_per_s"]
        print(f"\nkeel/trl pairs per second of training: {ratio:.2f}x")
    print(
        "\npairs/s = steps x pairs per step / train s (keel: its loop less the final evaluation and checkpoint; "
        "trl: train()); setup = model, data and reference pass; wall = everything, the implementation's own "
        "evaluation included. keel's row is its evaluation, trl's is evaluate(); 'val kl' is the mean "
        "log pi/ref of the responses (for TRL, from its rewards/chosen and rewards/rejected)."
    )
    load_average = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average now {load_average}")


if __name__ == "__main__":
    main()
