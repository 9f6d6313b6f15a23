"""LoRA: low-rank adapters on a finished model's linear layers, the base frozen (Hu et al., 2021).

Applied from outside, like activation checkpointing: `apply_lora` swaps each targeted nn.Linear of
the blocks for a `LoRALinear` that keeps the very same (now frozen) weight and adds

    y = x Wᵀ + (alpha / rank) · dropout(x) Aᵀ Bᵀ,   A (rank, in) Kaiming-uniform, B (out, rank) zero

so the adapted model starts as exactly the base. Parameter names stay those of the base
(`blocks.0.attn.q_proj.weight`) with `lora_a` / `lora_b` beside them.

Tokens the base vocabulary lacks (the chat markers an SFT data directory appends) would stay at
their initial embedding with everything else frozen, so their rows stay trainable: the embedding
(and an untied head) become `FrozenRows` with a frozen block for the base's rows and a small
trainable one (`added`) for the new rows, as PEFT's trainable_token_indices does.

Only trainable parameters reach a LoRA run's checkpoints (keel.train.checkpoint); the rest comes from
the base run (init.from), whose identity each checkpoint records (`base_identity`) so that adapters
are never loaded onto another base. `merge_lora` folds everything back into a plain GPT.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from keel.config import LoRAConfig
from keel.errors import UserError

# The linear layers of a block; lm_head stays out (the chunked loss reads its weight directly).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update; see the module docstring."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.off = False  # adapters_off: the base layer alone
        self.reset_adapter()

    def reset_adapter(self) -> None:
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init, as PEFT
        nn.init.zeros_(self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.off:
            return F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    def merged_weight(self) -> torch.Tensor:
        delta = (self.lora_b.float() @ self.lora_a.float()) * self.scaling
        return (self.weight.float() + delta).to(self.weight.dtype)


class FrozenRows(nn.Module):
    """A (V, C) embedding or head matrix whose first rows are frozen and the rest trainable."""

    def __init__(self, frozen: nn.Parameter, added: nn.Parameter, embedding: bool):
        super().__init__()
        self.frozen, self.added, self.embedding = frozen, added, embedding
        self.off = False  # adapters_off: the added rows at their step-0 value

    @property
    def weight(self) -> torch.Tensor:
        added = self.frozen.mean(dim=0, keepdim=True).expand_as(self.added) if self.off else self.added
        return torch.cat((self.frozen, added))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight) if self.embedding else F.linear(x, self.weight)


def apply_lora(model: nn.Module, config: LoRAConfig, base_vocab: int) -> None:
    """Freeze `model` (a GPT) and add adapters on config.targets; rows from base_vocab on stay trainable."""
    for param in model.parameters():
        param.requires_grad_(False)
    wanted = target_names(config)
    found = {name: False for name in wanted}
    for block_index, block in enumerate(model.blocks):
        for part in (block.attn, block.mlp):
            for attr, child in list(part.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                full = f"blocks.{block_index}.{'attn' if part is block.attn else 'mlp'}.{attr}"
                hits = [name for name in wanted if full == name or full.endswith("." + name)]
                for name in hits:
                    found[name] = True
                if hits:
                    setattr(part, attr, LoRALinear(child, config.rank, config.alpha, config.dropout))
    # "all" takes the linear layers the model has (a relu2 MLP has no gate_proj)
    missing = [name for name, hit in found.items() if not hit and config.targets.strip() != "all"]
    if missing:
        raise UserError(
            f"lora.targets names {', '.join(missing)}, which matches no linear layer; use names among "
            f"{', '.join(TARGETS)} (or a dotted path such as blocks.0.attn.q_proj), or all."
        )
    _free_added_rows(model, base_vocab)


def target_names(config: LoRAConfig) -> list[str]:
    names = [name.strip() for name in config.targets.split(",") if name.strip()]
    return list(TARGETS) if names == ["all"] else names


def _free_added_rows(model: nn.Module, base_vocab: int) -> None:
    vocab = model.embed.weight.shape[0]
    if base_vocab >= vocab:
        return
    tied = model.lm_head.weight is model.embed.weight

    def split(weight: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
        frozen = nn.Parameter(weight.detach()[:base_vocab].clone(), requires_grad=False)
        return frozen, nn.Parameter(weight.detach()[base_vocab:].clone())

    frozen, added = split(model.embed.weight)
    model.embed = FrozenRows(frozen, added, embedding=True)
    head = (frozen, added) if tied else split(model.lm_head.weight)
    model.lm_head = FrozenRows(*head, embedding=False)


def is_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """`model` as its base: adapters skipped and added rows at their step-0 value (reset_adapters), so
    the base's outputs, bit for bit, without a second copy of it in memory (DPO's reference)."""
    modules = [m for m in model.modules() if isinstance(m, (LoRALinear, FrozenRows))]
    for module in modules:
        module.off = True
    try:
        yield
    finally:
        for module in modules:
            module.off = False


def reset_adapters(model: nn.Module, seed: int) -> None:
    """The adapters of step 0 again (a rollback to before every checkpoint): the base is untouched.

    Added rows start, as load_init_weights starts them, at the mean of the base's rows."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.reset_adapter()
    with torch.no_grad():
        for module in (model.embed, model.lm_head):
            if isinstance(module, FrozenRows):
                module.added.copy_(module.frozen.mean(dim=0, keepdim=True).expand_as(module.added))


def merge_lora(model: nn.Module) -> None:
    """Fold the adapters (and the added rows) into plain nn.Linear / nn.Embedding weights, in place."""
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.to(child.weight.device)
                with torch.no_grad():
                    linear.weight = nn.Parameter(child.merged_weight())
                    if child.bias is not None:
                        linear.bias = nn.Parameter(child.bias.detach().clone())
                setattr(module, attr, linear)
    if isinstance(model.embed, FrozenRows):
        tied = model.lm_head.added is model.embed.added
        embed = nn.Embedding(*model.embed.weight.shape).to(model.embed.frozen.device)
        embed.weight = nn.Parameter(model.embed.weight.detach().clone())
        model.embed = embed
        if tied:
            model.lm_head = nn.Linear(embed.weight.shape[1], embed.weight.shape[0], bias=False)
            model.lm_head.weight = embed.weight
        else:
            head = model.lm_head.weight.detach().clone()
            model.lm_head = nn.Linear(head.shape[1], head.shape[0], bias=False)
            model.lm_head.weight = nn.Parameter(head)
    for param in model.parameters():
        param.requires_grad_(True)


def base_identity(base_run: Path) -> dict[str, str]:
    """Which weights a LoRA run adapts: the base run's best checkpoint and its weights' sha256."""
    from keel.train import checkpoint as ckpt

    best = ckpt.find_best(base_run)
    return {"run": str(Path(base_run).resolve()), "checkpoint": best.name, "weights_sha256": ckpt.weights_sha256(best)}


def check_base(recorded: dict[str, str] | None, base_run: Path, where: Path) -> None:
    """Refuse adapters saved against another base than base_run's best checkpoint today."""
    if recorded is None:
        return
    now = base_identity(base_run)
    if now["weights_sha256"] != recorded["weights_sha256"]:
        raise UserError(
            f"the adapters in {where} were trained on {recorded['run']} ({recorded['checkpoint']}, weights sha256 "
            f"{recorded['weights_sha256'][:12]}), but init.from={base_run} now gives {now['checkpoint']} "
            f"(sha256 {now['weights_sha256'][:12]}); point init.from at the original base."
        )


def write_peft_adapter(model: nn.Module, config: LoRAConfig, out_dir: Path) -> None:
    """The adapters in PEFT's format (adapter_config.json + adapter_model.safetensors) for the base
    exported as Hugging Face Llama, so `peft.PeftModel.from_pretrained(llama, out_dir)` loads them.

    Added vocabulary rows have no place in that format; a run with them is refused."""
    import safetensors.torch

    from keel.models.hf import _llama_key

    if isinstance(model.embed, FrozenRows):
        raise UserError(
            "this LoRA run also trained embedding rows for tokens its base lacks, which PEFT's adapter format "
            "cannot carry; export the merged model instead (keel export without --adapters)."
        )
    tensors, modules = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            llama = _llama_key(f"{name}.weight").removesuffix(".weight")  # model.layers.0.self_attn.q_proj
            modules.add(llama.rsplit(".", 1)[-1])
            tensors[f"base_model.model.{llama}.lora_A.weight"] = module.lora_a.detach().float().contiguous().cpu()
            tensors[f"base_model.model.{llama}.lora_B.weight"] = module.lora_b.detach().float().contiguous().cpu()
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))


def lora_for_run(model: nn.Module, config) -> dict[str, str] | None:
    """Apply config.lora (a RunConfig's) to the model built for the run, its base weights loaded; returns
    the base's identity for the checkpoints' meta, or None when the run trains every weight."""
    if not config.lora.rank:
        return None
    from keel.runs.rundir import load_run_config

    base_run = Path(config.init.from_)
    apply_lora(model, config.lora, load_run_config(base_run).model.vocab_size)
    return base_identity(base_run)
