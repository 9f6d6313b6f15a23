"""Using a trained run: load its best-known weights, sample text (or images), chat, measure held-out loss."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from keel.config import RunConfig
from keel.data import eval_batches, open_data
from keel.data.chat import CHAT_TOKENS, Message, Template, render, template_of
from keel.data.tokenizer import EOT
from keel.errors import UserError
from keel.models.gpt import GPT
from keel.models.lora import check_base, lora_for_run, merge_lora
from keel.runs.rundir import TOKENIZER_FILE, load_run_config
from keel.tasks.lm import load_init_weights, mean_token_loss
from keel.train import checkpoint as ckpt
from keel.train.precision import pick_device, pick_dtype


@dataclass
class LoadedRun:
    config: RunConfig
    model: GPT
    tokenizer: Tokenizer
    step: int
    device: torch.device
    dtype: torch.dtype
    path: Path  # the run directory
    checkpoint: Path | None = None  # the checkpoint directory the weights came from


def load_run(run_dir: Path, device: str = "auto", int8: bool = False) -> LoadedRun:
    """The run's newest checkpoint that passes its checksums, in eval mode.

    int8 quantizes the model for CPU inference (keel.models.quantize) and so runs on the CPU, in float32.
    """
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    if config.task.kind == "diffusion":
        raise UserError(
            f"{run_dir} is a diffusion run: keel sample makes its images and keel eval scores it; "
            "chat and export are for language models."
        )
    path, bad = ckpt.find_latest_good(run_dir)
    for bad_path, reason in bad:
        print(f"warning: checkpoint {bad_path.name} is unusable ({reason}); using an older one.")
    if path is None:
        raise UserError(f"{run_dir} has no usable checkpoint yet; train it first with keel train.")
    if int8 and device not in ("auto", "cpu"):
        raise UserError(f"--int8 runs on the CPU (its int8 kernels are CPU kernels); leave out --int8 on {device}.")
    torch_device = pick_device("cpu" if int8 else device)
    model = GPT(config.model).to(torch_device)
    if config.lora.rank:  # the base's weights, the run's adapters on them, folded in for speed
        load_init_weights(model, Path(config.init.from_))
        lora_for_run(model, config)
        check_base(ckpt.read_meta(path).get("lora_base"), Path(config.init.from_), run_dir)
    _, meta = ckpt.load_checkpoint(path, model, torch_device)
    merge_lora(model)
    model.eval()
    tokenizer = Tokenizer.from_file(str(run_dir / TOKENIZER_FILE))
    dtype = torch.float32 if int8 else pick_dtype(config.train.dtype, torch_device)
    if int8:
        from keel.models.quantize import quantize_int8

        model = quantize_int8(model)
    return LoadedRun(config, model, tokenizer, meta["step"], torch_device, dtype, run_dir, path)


def sample(
    run: LoadedRun,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 0,
) -> str:
    """Continue `prompt`; the returned text includes the prompt."""
    check_sampling(temperature, max_new_tokens, top_p)
    eot = run.tokenizer.token_to_id("<|endoftext|>")
    ids = [eot] + run.tokenizer.encode(prompt).ids  # a document starts after end-of-text in training
    ids = ids[-run.config.model.context_length + 1 :]
    generator = torch.Generator(device=run.device).manual_seed(seed)
    idx = torch.tensor([ids], device=run.device)
    out = run.model.generate(
        idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eot_id=eot, generator=generator
    )
    return run.tokenizer.decode([i for i in out[0].tolist() if i != eot])


def chat_template(run: LoadedRun) -> Template:
    """The ids of the run's chat markers; a UserError for a run without them (a pretraining run)."""
    if any(run.tokenizer.token_to_id(token) is None for token in (EOT, *CHAT_TOKENS)):
        raise UserError(
            f"{run.path}'s tokenizer has no chat template; fine-tune it with task.kind=sft on chat data "
            f"(keel prepare CHATS.jsonl --out DATA_DIR --tokenizer {run.path}), or use keel sample"
        )
    return template_of(run.tokenizer)


def fit_history(tokenizer: Tokenizer, messages: list[Message], context_length: int, reply_tokens: int) -> list[Message]:
    """The newest messages whose rendering with the generation prompt leaves reply_tokens of the context free.

    The oldest turns go first; leading system turns always stay, and the kept history never starts with
    an assistant turn that lost its question. A UserError if not even the last message fits.
    """
    # Each message's content is encoded on its own, so the rendering's length is the sum of per-message
    # lengths plus <|endoftext|> in front and <|assistant|> at the end.
    lengths = [len(render(tokenizer, [message])[0]) - 1 for message in messages]  # - the leading <|endoftext|>
    num_system = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    max_prompt_tokens = context_length - reply_tokens
    fixed = 2 + sum(lengths[:num_system])
    budget = max_prompt_tokens - fixed
    start = len(messages)
    while start > num_system and lengths[start - 1] <= budget:
        start -= 1
        budget -= lengths[start]
    if start == len(messages) and start > num_system:
        what = "the last message and the system turn need" if num_system else "the last message needs"
        raise UserError(
            f"{what} {fixed + lengths[-1]} tokens with the chat markers, but the model's context of {context_length} "
            f"tokens leaves only {max(max_prompt_tokens, 0)} once --max-new-tokens {reply_tokens} are kept for the "
            "reply; shorten the message or lower --max-new-tokens"
        )
    while start < len(messages) - 1 and messages[start]["role"] == "assistant":
        start += 1
    return messages[:num_system] + messages[start:]


def check_sampling(temperature: float, max_new_tokens: int, top_p: float | None) -> None:
    """One sentence for sampling settings that cannot work (nan passes every comparison, so test it)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature must be a finite number >= 0 (0 is greedy), got {temperature}.")
    if max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {max_new_tokens}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p must be within (0, 1], got {top_p}.")


def chat_reply(
    run: LoadedRun,
    messages: list[Message],
    max_new_tokens: int | None = None,
    temperature: float = 0.7,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 0,
) -> str:
    """The assistant's reply to `messages` (system, user and assistant turns, usually ending with the user's).

    The history is rendered with the chat template and the generation prompt. max_new_tokens (default half the
    context) is kept free for the reply; turns that no longer fit in the rest are dropped, oldest first (see
    fit_history). The reply ends at <|end|> or <|endoftext|> and carries no markers.
    """
    template = chat_template(run)
    context_length = run.config.model.context_length
    max_new_tokens = context_length // 2 if max_new_tokens is None else max_new_tokens
    check_sampling(temperature, max_new_tokens, top_p)
    history = fit_history(run.tokenizer, messages, context_length, max_new_tokens)
    ids, _ = render(run.tokenizer, history, add_generation_prompt=True)
    generator = torch.Generator(device=run.device).manual_seed(seed)
    # generate stops early on one id only: <|end|>, the end of a turn. <|endoftext|> ends the reply below.
    out = run.model.generate(
        torch.tensor([ids], device=run.device),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eot_id=template.end_id,
        generator=generator,
    )
    reply = out[0, len(ids) :].tolist()
    stops = (template.end_id, template.eot_id)
    end = next((i for i, token in enumerate(reply) if token in stops), len(reply))
    return run.tokenizer.decode(reply[:end])


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int


def evaluate_run(run: LoadedRun, data_dir: Path | None = None, max_batches: int | None = None) -> EvalResult:
    """Loss over the whole val split (or its first max_batches batches), perplexity and bits per byte.

    Bits per byte divides the nats per token by ln 2 and by the split's bytes per token, so models
    with different tokenizers compare fairly.
    """
    data = open_data(Path(data_dir or run.config.data.path))
    if Tokenizer.from_file(str(data.path / TOKENIZER_FILE)).to_str() != run.tokenizer.to_str():
        raise UserError(
            f"{data.path} was tokenized with another tokenizer than the run's; evaluate on data prepared "
            "with the run's tokenizer (or on the run's own data, the default)."
        )
    tokens = data.tokens("val")
    context, batch = run.config.model.context_length, run.config.train.batch_size
    num_windows = (len(tokens) - 1) // context
    num_batches = max_batches or max(1, -(-num_windows // batch))  # every whole window
    batches = eval_batches(tokens, context, batch, num_batches, split_name=data.split_name("val"))
    loss = mean_token_loss(run.model, ({"inputs": x, "targets": y} for x, y in batches), run.device, run.dtype)
    split = data.manifest["splits"]["val"]
    bytes_per_token = split["bytes"] / split["tokens"]
    num_tokens = min(num_windows, num_batches * batch) * context
    return EvalResult(loss, math.exp(loss), loss / math.log(2) / bytes_per_token, num_tokens)


def evaluate_task(run: LoadedRun) -> dict[str, float]:
    """A fine-tuned run's own held-out numbers over its whole val split: completion loss (SFT); preference
    loss, reward accuracy, margin, log-probs and KL estimate (DPO, from the run's cached reference)."""
    import dataclasses

    from keel.tasks import build_task

    whole = dataclasses.replace(run.config.train, eval_batches=1 << 30)
    config = dataclasses.replace(run.config, train=whole)
    return build_task(config, run.device, run.dtype).evaluate(run.model)


def merge_run(run_dir: Path, out: Path) -> Path:
    """Write a LoRA run's newest good checkpoint, adapters folded into the weights, as a plain run
    directory `out` (for sample, eval, chat, export, or init.from of another run). Written beside `out`
    and renamed into place, so a refused or interrupted merge leaves nothing that looks complete."""
    import dataclasses
    import shutil

    from keel import config as config_lib
    from keel.config import LoRAConfig
    from keel.runs.rundir import CONFIG_FILE, LOCK_FILE

    run_dir, out = Path(run_dir), Path(out)
    config = load_run_config(run_dir)
    if not config.lora.rank:
        raise UserError(
            f"{run_dir} has no adapters (lora.rank=0): its checkpoints hold every weight already; use it as it is."
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; pass a new directory.")
    run = load_run(run_dir)
    tmp = out.with_name(f".{out.name}.tmp-merge")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = ckpt.read_meta(ckpt.find_latest_good(run_dir)[0])
        merged = dataclasses.replace(config, lora=LoRAConfig())
        ckpt.save_checkpoint(
            tmp,
            run.step,
            run.model,
            {},
            {**meta, "lora_base": None, "merged_from": str(run_dir.resolve()), "config": merged.to_dict()},
            keep_last=1,
        )
        config_lib.save(merged, tmp / CONFIG_FILE)
        shutil.copyfile(run_dir / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        (tmp / LOCK_FILE).touch()
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---- diffusion runs ------------------------------------------------------------------------------


@dataclass
class DiffusionRun:
    config: RunConfig
    model: torch.nn.Module  # a DiT holding the checkpoint's EMA weights, in eval mode
    images: dict  # the run's images.json: channels, height, width, num_classes, class_names
    step: int
    device: torch.device
    path: Path  # the run directory
    checkpoint: Path


def load_diffusion_run(run_dir: Path, device: str = "auto") -> DiffusionRun:
    """A diffusion run's newest checkpoint that passes its checksums, with its EMA weights (what sampling
    and evaluation use) in the model."""
    import json

    from keel.models.dit import DiT
    from keel.runs.rundir import IMAGES_FILE
    from keel.tasks.diffusion import dit_config

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    if config.task.kind != "diffusion":
        raise UserError(f"{run_dir} is a {config.task.kind} run, not a diffusion run.")
    path, bad = ckpt.find_latest_good(run_dir)
    for bad_path, reason in bad:
        print(f"warning: checkpoint {bad_path.name} is unusable ({reason}); using an older one.")
    if path is None:
        raise UserError(f"{run_dir} has no usable checkpoint yet; train it first with keel train.")
    images = json.loads((run_dir / IMAGES_FILE).read_text())
    torch_device = pick_device(device)
    model = DiT(dit_config(config, images)).to(torch_device)
    train_state, meta = ckpt.load_checkpoint(path, model, torch_device)
    ema = train_state.get("task", {}).get("ema")
    if ema is not None:  # the raw weights otherwise (a checkpoint keel merge wrote carries no task state)
        model.load_state_dict(ema["weights"], strict=True)
    model.eval()
    return DiffusionRun(config, model, images, meta["step"], torch_device, run_dir, path)


def sample_grid(
    run: DiffusionRun,
    out: Path | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    columns: int = 8,
) -> tuple[Path, int]:
    """Write a PNG grid of samples, one row per class (four rows of an unlabelled model), `columns` images
    each; sampler, steps and guidance default to the run's diffusion.* settings. Returns (path, rows)."""
    from keel.tasks.diffusion import grid_labels, sample_images, save_grid

    if columns < 1:
        raise UserError(f"--columns must be a positive integer, got {columns}.")
    f = run.config.diffusion
    labels, rows = grid_labels(run.images["num_classes"], columns)
    images = sample_images(
        run.model,
        f.objective,
        len(labels),
        labels,
        sampler or f.sampler,
        f.sample_steps if steps is None else steps,
        f.guidance if guidance is None else guidance,
        seed,
    )
    out = Path(out) if out is not None else run.path / "samples" / f"sample-step{run.step}-seed{seed}.png"
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must name a .png file.")
    return save_grid(images, rows, out), rows


def evaluate_diffusion(run: DiffusionRun) -> dict[str, float]:
    """The run's diffusion loss with its EMA weights over its data's whole val split (fixed noise and t)."""
    import dataclasses

    from keel.data.images import open_images
    from keel.tasks.diffusion import validation_loss

    data = open_images(Path(run.config.data.path))
    whole = dataclasses.replace(run.config.train, eval_batches=1 << 30)
    config = dataclasses.replace(run.config, train=whole)
    dtype = pick_dtype(config.train.dtype, run.device)
    return {"val_loss": validation_loss(run.model, data, config, run.device, dtype)}


def score_diffusion(
    run: DiffusionRun,
    num: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
) -> tuple[dict[str, dict], float]:
    """The image quality table of a run (keel.tasks.image_quality): `num` class-conditional samples (the
    classes in turn; by default as many as the val split holds, at most 500) scored beside the reference
    rows on as many images, and the classifier's accuracy on held-out real images. Sampler, steps and
    guidance default to the run's diffusion.* settings."""
    from keel.tasks.diffusion import sample_images
    from keel.tasks.image_quality import QualityScorer

    if run.images["num_classes"] == 0:
        raise UserError(
            f"{run.path} was trained on unlabelled images; the quality score needs class labels "
            "(keel's classifier is its yardstick), so keel eval gives its val loss only: pass --samples 0."
        )
    scorer = QualityScorer(Path(run.config.data.path))
    num = min(500, len(scorer.data.val_images)) if num is None else num
    reference = scorer.reference_rows(num, seed)  # checks num against the val split first
    f = run.config.diffusion
    labels = np.arange(num) % run.images["num_classes"]
    samples = sample_images(
        run.model,
        f.objective,
        num,
        torch.from_numpy(labels),
        sampler or f.sampler,
        f.sample_steps if steps is None else steps,
        f.guidance if guidance is None else guidance,
        seed,
    )
    name = f"samples (step {run.step})"
    return {name: scorer.score(samples, labels, seed), **reference}, scorer.classifier.val_accuracy
