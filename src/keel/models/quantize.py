"""int8 for CPU inference: dynamic quantization of a finished GPT's linear layers, applied from outside.

Each nn.Linear of the blocks becomes PyTorch's dynamically quantized linear (`torch.ao.quantization.
quantize_dynamic`): weights stored as int8 with one scale per output row, activations quantized to int8
on the fly per call, the matmul done by fbgemm's int8 kernels, the output in float32. Why this and not
the alternatives (measured in bench/int8.py, figures in docs/benchmarks.md):

- torchao (0.18) works with torch 2.13, and its weight-only int8 (`Int8WeightOnlyConfig`) is as small and
  loses nothing measurable, but on an AVX2-only CPU it gained less speed than this in generation and
  next to none in evaluation; it would also be a dependency whose import complains about its CUDA
  extensions on a CPU machine. torch's own weight-only kernel (`_weight_int8pack_mm`) was several times
  slower than float32 there. Dynamic int8 through fbgemm is what made the CPU faster.
- The output projection stays float32: with tied embeddings it is the embedding matrix, which the
  lookup needs in float anyway (an int8 copy would add memory, not save it), and keel's evaluation reads
  `lm_head.weight` directly through its chunked loss.

The quantized model runs on the CPU only and cannot be trained.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from keel.models.gpt import GPT


def quantize_int8(model: GPT) -> GPT:
    """`model` (on the CPU, float32, eval mode) with its blocks' linear layers quantized to int8, in place."""
    assert not model.training and next(model.parameters()).device.type == "cpu", "quantize an eval-mode CPU model"
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    targets = {
        f"blocks.{name}": qconfig for name, module in model.blocks.named_modules() if isinstance(module, nn.Linear)
    }
    with warnings.catch_warnings():
        # torch 2.10+ warns that torch.ao.quantization moves to torchao; torchao's CPU int8 is slower here (above).
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(model, targets, dtype=torch.qint8, inplace=True)
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights: parameters (a tied matrix once; a tensor subclass such as torchao's by the
    tensors it holds) and dynamically quantized int8 weights at one byte each (their per-row scales left out)."""
    total = sum(_tensor_bytes(p) for p in model.parameters())  # parameters() skips tied repeats
    for module in model.modules():
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):  # holds its weight packed, not as a parameter
            total += module.weight().numel()
    return total


def _tensor_bytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):  # a wrapper subclass: its own size says nothing of its storage
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()
