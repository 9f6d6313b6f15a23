"""Using a trained run: load its best-known weights, sample text, measure held-out loss."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from keel.config import RunConfig
from keel.data import eval_batches, open_data
from keel.errors import UserError
from keel.models.gpt import GPT
from keel.runs.rundir import TOKENIZER_FILE, load_run_config
from keel.train import checkpoint as ckpt
from keel.tasks.lm import mean_token_loss
from keel.train.precision import pick_device, pick_dtype


@dataclass
class LoadedRun:
    config: RunConfig
    model: GPT
    tokenizer: Tokenizer
    step: int
    device: torch.device
    dtype: torch.dtype


def load_run(run_dir: Path, device: str = "auto") -> LoadedRun:
    """The run's newest checkpoint that passes its checksums, in eval mode."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    path, bad = ckpt.find_latest_good(run_dir)
    for bad_path, reason in bad:
        print(f"warning: checkpoint {bad_path.name} is unusable ({reason}); using an older one.")
    if path is None:
        raise UserError(f"{run_dir} has no usable checkpoint yet; train it first with keel train.")
    torch_device = pick_device(device)
    model = GPT(config.model).to(torch_device)
    _, meta = ckpt.load_checkpoint(path, model, torch_device)
    model.eval()
    tokenizer = Tokenizer.from_file(str(run_dir / TOKENIZER_FILE))
    dtype = pick_dtype(config.train.dtype, torch_device)
    return LoadedRun(config, model, tokenizer, meta["step"], torch_device, dtype)


def sample(run: LoadedRun, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: int | None = 50, top_p: float | None = None, seed: int = 0) -> str:
    """Continue `prompt`; the returned text includes the prompt."""
    if temperature < 0 or max_new_tokens <= 0:
        raise UserError("--temperature must be >= 0 and --max-new-tokens positive.")
    eot = run.tokenizer.token_to_id("<|endoftext|>")
    ids = [eot] + run.tokenizer.encode(prompt).ids  # a document starts after end-of-text in training
    ids = ids[-run.config.model.context_length + 1:]
    generator = torch.Generator(device=run.device).manual_seed(seed)
    idx = torch.tensor([ids], device=run.device)
    out = run.model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             eot_id=eot, generator=generator)
    return run.tokenizer.decode([i for i in out[0].tolist() if i != eot])


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
        raise UserError(f"{data.path} was tokenized with another tokenizer than the run's; evaluate on data prepared "
                        "with the run's tokenizer (or on the run's own data, the default).")
    tokens = data.tokens("val")
    context, batch = run.config.model.context_length, run.config.train.batch_size
    num_batches = max_batches or max(1, (len(tokens) - 1) // (context * batch))
    batches = eval_batches(tokens, context, batch, num_batches, split_name=data.split_name("val"))
    loss = mean_token_loss(run.model, ({"inputs": x, "targets": y} for x, y in batches), run.device, run.dtype)
    split = data.manifest["splits"]["val"]
    bytes_per_token = split["bytes"] / split["tokens"]
    return EvalResult(loss, math.exp(loss), loss / math.log(2) / bytes_per_token,
                      min(num_batches * batch * context, len(tokens)))
