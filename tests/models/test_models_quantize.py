"""int8 for CPU inference: the quantized model stays close to the float one and every inference command takes it."""

import pytest
import torch
from conftest import keel

from keel.config import ModelConfig
from keel.errors import UserError
from keel.inference import load_run
from keel.models.gpt import GPT
from keel.models.quantize import model_bytes, quantize_int8


def test_int8_blocks_keep_the_logits_close_and_shrink_the_weights():
    config = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=128, context_length=32, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(config).eval()
    idx = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)
        before = model_bytes(model)
        quantized = quantize_int8(model)
        theirs = quantized(idx)
        generated = quantized.generate(idx[:, :4], 8, temperature=0)
    assert type(quantized.blocks[0].attn.q_proj).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert isinstance(quantized.lm_head, torch.nn.Linear) and quantized.lm_head.weight is quantized.embed.weight
    assert (theirs - ours).abs().max() < 0.05 * ours.abs().max()
    assert generated.shape == (2, 12)
    attention, mlp = 2 * 128 * 128 + 2 * 128 * 64, 3 * 128 * 384  # q, o; k, v (2 of 4 heads); gate, up, down
    assert before - model_bytes(quantized) == 2 * (attention + mlp) * 3  # float32 -> int8 saves 3 of 4 bytes


def test_int8_runs_on_the_cpu_only(base_run):
    run = load_run(base_run, int8=True)
    assert run.device.type == "cpu" and run.dtype == torch.float32
    with pytest.raises(UserError, match="--int8 runs on the CPU"):
        load_run(base_run, device="cuda", int8=True)


def test_sample_and_eval_take_int8(base_run):
    result = keel("sample", str(base_run), "--int8", "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0")
    assert result.returncode == 0 and result.stdout.startswith("def "), result.stderr
    result = keel("eval", str(base_run), "--int8")
    assert result.returncode == 0 and "bits/byte" in result.stdout, result.stderr
