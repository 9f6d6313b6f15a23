"""Map GPT to and from Hugging Face Llama (`transformers.LlamaForCausalLM`): config and weights, and write
a model directory that `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load without custom code.

GPT uses Llama's layout and rotary convention, so the mapping only renames tensors. This module
does not import transformers; the caller builds `transformers.LlamaConfig(**llama_config(config))`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from tokenizers import Tokenizer, processors

from keel.config import ModelConfig
from keel.errors import UserError
from keel.models.gpt import GPT, mlp_hidden_size, num_kv_heads

# GPT's name for each part of a block -> Llama's.
_BLOCK_PARTS = {
    "attn_norm": "input_layernorm",
    "attn": "self_attn",
    "mlp_norm": "post_attention_layernorm",
    "mlp": "mlp",
}
_LLAMA_PARTS = {llama: ours for ours, llama in _BLOCK_PARTS.items()}


def _check_exportable(config: ModelConfig) -> None:
    if config.qk_norm:
        raise UserError(
            "model.qk_norm=true has no Llama equivalent, so this model cannot be mapped to Hugging Face Llama; "
            "train with model.qk_norm=false to export."
        )


def llama_config(config: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for `transformers.LlamaConfig` describing GPT(config).

    bos/eos token ids belong to the tokenizer, so they are left unset here for the exporter to fill.
    """
    _check_exportable(config)
    assert config.vocab_size > 0, "resolve model.vocab_size before exporting"
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": mlp_hidden_size(config),
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": num_kv_heads(config),
        "head_dim": config.d_model // config.n_head,
        "hidden_act": "silu" if config.mlp == "swiglu" else "relu",  # relu2: relu(gate x) * up x, gate = up
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def _llama_key(key: str) -> str:
    """GPT state-dict key -> Llama key, e.g. blocks.3.attn.q_proj.weight -> model.layers.3.self_attn.q_proj.weight."""
    if key == "embed.weight":
        return "model.embed_tokens.weight"
    if key == "norm_f.weight":
        return "model.norm.weight"
    if key == "lm_head.weight":
        return key
    match = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.(.+)", key)
    assert match is not None and match[2] in _BLOCK_PARTS, f"no Llama name for {key}"
    return f"model.layers.{match[1]}.{_BLOCK_PARTS[match[2]]}.{match[3]}"


def to_llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """GPT weights under Llama's names (tensors shared, not copied).

    With tied embeddings lm_head.weight is left out, as Hugging Face checkpoints do.
    """
    _check_exportable(model.config)
    state = model.state_dict()
    if model.config.tie_embeddings:
        del state["lm_head.weight"]
    llama = {_llama_key(key): tensor for key, tensor in state.items()}
    if model.config.mlp == "relu2":  # Llama's gated MLP with a ReLU and gate = up computes relu(up x)^2
        for key in [key for key in llama if key.endswith("mlp.up_proj.weight")]:
            llama[key.replace("up_proj", "gate_proj")] = llama[key]
    return llama


def from_llama_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Llama weights -> a state dict for `GPT(config).load_state_dict`.

    With tied embeddings lm_head.weight is taken from the embedding when the checkpoint lacks it.
    """
    _check_exportable(config)
    with torch.device("meta"):  # only the names are needed; meta tensors cost no memory
        expected = {_llama_key(key): key for key in GPT(config).state_dict()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    # Older Llama checkpoints also store the rotary inverse frequencies, which GPT recomputes.
    llama_keys = {key for key in state if not key.endswith("rotary_emb.inv_freq")}
    if config.mlp == "relu2":  # exported with gate = up (see to_llama_state_dict)
        for key in [key for key in llama_keys if key.endswith("mlp.gate_proj.weight")]:
            if not torch.equal(state[key], state.get(key.replace("gate_proj", "up_proj"), torch.empty(0))):
                raise UserError(
                    f"{key} differs from its up_proj, so these Llama weights are not a model.mlp=relu2 model; "
                    "use model.mlp=swiglu."
                )
            llama_keys.discard(key)
    if config.tie_embeddings:
        llama_keys.discard("lm_head.weight")
    missing, unexpected = sorted(expected.keys() - llama_keys), sorted(llama_keys - expected.keys())
    if missing or unexpected:
        raise UserError(
            f"the Llama weights do not fit this model config (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "use the config the weights were made with."
        )
    ours = {expected[key]: state[key] for key in expected}
    if config.tie_embeddings:
        ours["lm_head.weight"] = ours["embed.weight"]
    return ours


@dataclass(frozen=True)
class SpecialTokens:
    """The tokens an exported model is told about: bos starts every prompt (keel's <|endoftext|>), generation
    stops at any of eos_ids (the first is the tokenizer's eos_token), pad fills batches."""

    bos: str
    eos: str
    pad: str
    bos_id: int
    eos_ids: tuple[int, ...]
    pad_id: int


def write_hf_dir(
    model: GPT,
    tokenizer: Tokenizer,
    out: Path,
    *,
    dtype: torch.dtype,
    special: SpecialTokens,
    chat_template: str | None,
) -> None:
    """Write config.json, model.safetensors, generation_config.json, tokenizer.json and tokenizer_config.json.

    The tokenizer gets a post-processor that puts bos in front of every encoded text, so `tokenizer(text)`
    gives the ids `keel sample` feeds the model; `apply_chat_template` renders bos itself and adds no other.
    """
    config = llama_config(model.config)
    eos_id: int | list[int] = special.eos_ids[0] if len(special.eos_ids) == 1 else list(special.eos_ids)
    dtype_name = str(dtype).removeprefix("torch.")
    hf_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **config,
        "bos_token_id": special.bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": special.pad_id,
        "initializer_range": 0.02,
        "use_cache": True,
        # transformers 4 reads torch_dtype, 5 reads dtype.
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }
    _write_json(out / "config.json", hf_config)
    generation = {"bos_token_id": special.bos_id, "eos_token_id": eos_id, "pad_token_id": special.pad_id}
    _write_json(out / "generation_config.json", generation)
    tensors = {name: t.detach().to(dtype).contiguous() for name, t in to_llama_state_dict(model).items()}
    safetensors.torch.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    exported = Tokenizer.from_str(tokenizer.to_str())
    exported.post_processor = processors.TemplateProcessing(
        single=f"{special.bos} $A", pair=f"{special.bos} $A $B:1", special_tokens=[(special.bos, special.bos_id)]
    )
    exported.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        # transformers 5 would record TokenizersBackend, which 4.x does not know; both load this class.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special.bos,
        "eos_token": special.eos,
        "pad_token": special.pad,
        "model_max_length": model.config.context_length,
        "clean_up_tokenization_spaces": False,  # byte-level BPE decodes exactly; no space fixing
    }
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    _write_json(out / "tokenizer_config.json", tokenizer_config)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
