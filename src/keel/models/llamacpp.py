"""Write a GPT and its byte-level BPE tokenizer as one llama-architecture GGUF file, for llama.cpp.

Tensor names are llama.cpp's (`token_embd`, `blk.N.attn_q`, ..., `output_norm`; `output` only when the
embeddings are untied, since llama.cpp falls back to `token_embd` for the head). They are found by way
of the Hugging Face Llama names (keel.models.hf) and the `gguf` package's own name table.

Rotary layout. GPT rotates dims i and i + hs/2 of each head together (Hugging Face's rotate_half);
llama.cpp's llama architecture rotates adjacent dims 2i and 2i + 1. The rotation is applied to q and
k after their projections, so reordering the rows of q_proj and k_proj head by head, (hs/2 pairs of
[i, i + hs/2]) -> adjacent, makes llama.cpp compute the same attention scores: q.k is a sum over
dims and does not care about their order, and v and o_proj are untouched. `to_adjacent_pairs` does
that; llama.cpp's converter does the same for Hugging Face checkpoints.

The tokenizer goes in as "gpt2" (byte-level BPE) with the "gpt-2" pre-tokenizer, which is the regex
of `tokenizers`' ByteLevel pre-tokenizer that keel trains with. Special tokens are CONTROL tokens;
add_bos_token makes llama.cpp start a prompt with <|endoftext|>, as keel starts every document.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer

from keel.models.gpt import GPT, mlp_hidden_size, num_kv_heads
from keel.models.hf import to_llama_state_dict

# Q8_0 stores blocks of 32 weights along a row, each block with one fp16 scale (34 bytes per 32 weights).
Q8_BLOCK = 32


def to_adjacent_pairs(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q or k projection (num_heads * hs, d) from rotate_half pairs to adjacent pairs.

    Within each head, row i + hs/2 moves next to row i: new order i0, i0+hs/2, i1, i1+hs/2, ...
    """
    rows, cols = weight.shape
    head_dim = rows // num_heads
    halves = weight.reshape(num_heads, 2, head_dim // 2, cols)  # (nh, [first half, second half], hs/2, d)
    return halves.transpose(1, 2).reshape(rows, cols)  # (nh, hs/2, 2, d): the pair (i, i + hs/2) side by side


def write_gguf(
    model: GPT,
    tokenizer: Tokenizer,
    path: Path,
    *,
    dtype: torch.dtype,
    int8: bool,
    name: str,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    chat_template: str | None,
) -> None:
    """Write `model` (on the CPU) with `tokenizer` to `path`.

    Matrices are stored in `dtype` (float32, float16 or bfloat16), or as Q8_0 when int8 (a matrix whose rows
    are not a whole number of 32-weight blocks keeps `dtype`); norm weights always in float32, as llama.cpp
    expects of one-dimensional tensors.
    """
    config = model.config
    assert config.mlp == "swiglu", "llama.cpp's llama architecture has only the SiLU-gated MLP (export.py refuses)"
    head_dim = config.d_model // config.n_head
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if int8 else _FILE_TYPES[dtype]
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(mlp_hidden_size(config))
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(num_kv_heads(config))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)

    tokens, token_types = _vocabulary(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(_merges(tokenizer))
    writer.add_bos_token_id(bos_id)
    writer.add_eos_token_id(eos_id)
    writer.add_pad_token_id(pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.n_layer)
    for llama_name, tensor in to_llama_state_dict(model).items():
        tensor = tensor.detach().float()
        if llama_name.endswith("q_proj.weight"):
            tensor = to_adjacent_pairs(tensor, config.n_head)
        elif llama_name.endswith("k_proj.weight"):
            tensor = to_adjacent_pairs(tensor, num_kv_heads(config))
        gguf_name = names.get_name(llama_name, try_suffixes=(".weight",))
        assert gguf_name is not None, f"no GGUF name for {llama_name}"
        data, raw_type = _encode(tensor, dtype, int8)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_type)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _encode(tensor: torch.Tensor, dtype: torch.dtype, int8: bool):
    """(numpy data, GGML type or None) of one float32 tensor for the file."""
    array = tensor.numpy()
    if tensor.dim() == 1:
        return array, None  # float32
    if int8 and tensor.shape[-1] % Q8_BLOCK == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if dtype == torch.bfloat16:
        # torch's float32 -> bfloat16 rounds to nearest even like ggml's; the bits go in as they are.
        return tensor.to(torch.bfloat16).view(torch.int16).numpy(), gguf.GGMLQuantizationType.BF16
    if dtype == torch.float16:
        return array.astype(np.float16), None
    return array, None


_FILE_TYPES = {
    torch.float32: gguf.LlamaFileType.ALL_F32,
    torch.float16: gguf.LlamaFileType.MOSTLY_F16,
    torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16,
}


def _vocabulary(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every token string by id (byte-level strings, as tokenizer.json holds them) and its GGUF token type.

    A model whose embedding has more rows than the tokenizer has tokens gets unused placeholders for the rest.
    """
    by_id = {i: token for token, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    special = {i for i, added in tokenizer.get_added_tokens_decoder().items() if added.special}
    assert len(by_id) <= vocab_size, "the model's vocabulary holds every token of its tokenizer"
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    return tokens, types


def _merges(tokenizer: Tokenizer) -> list[str]:
    """The BPE merges as "left right" strings, in rank order."""
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    # tokenizers writes each merge as a [left, right] pair (older versions: one "left right" string).
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]
