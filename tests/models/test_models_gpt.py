import math
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from keel.config import ModelConfig
from keel.errors import UserError
from keel.models.gpt import GPT, KVCache, mlp_hidden_size, sample_next_token
from keel.tasks import lm
from keel.tasks.lm import IGNORE_INDEX, linear_cross_entropy, token_loss


def tiny(**overrides) -> ModelConfig:
    fields = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, context_length=48, vocab_size=256)
    return ModelConfig(**{**fields, **overrides})


def python_bytes(num_rows: int, length: int) -> torch.Tensor:
    """(num_rows, length) windows of a stdlib source file's bytes: real text, byte-level vocabulary."""
    data = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_bytes()
    rows = [list(data[i * length : (i + 1) * length]) for i in range(num_rows)]
    return torch.tensor(rows, dtype=torch.long)


def greedy_by_recompute(model: GPT, idx: torch.Tensor, num_new: int) -> torch.Tensor:
    for _ in range(num_new):
        logits = model(idx)
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


def loss_of(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return token_loss(model, {"inputs": idx, "targets": targets}).loss


def reference_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    kept = targets != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(logits[kept].float(), targets[kept])


@pytest.mark.parametrize("rows", [None, 7])  # one chunk; 7-row chunks, the last one short
def test_loss_head_equals_cross_entropy_of_the_logits_in_value_and_gradients(monkeypatch, rows):
    if rows:
        monkeypatch.setattr(lm, "loss_chunk_rows", lambda vocab_size, d_model: rows)
    torch.manual_seed(0)
    hidden = torch.randn(3, 17, 64, requires_grad=True)
    weight = (0.3 * torch.randn(256, 64)).requires_grad_()
    targets = torch.randint(0, 256, (3, 17))
    targets[0, :5] = IGNORE_INDEX
    head = linear_cross_entropy(hidden, weight, targets)
    head.loss.backward()
    logits = hidden @ weight.t()
    torch.testing.assert_close(head.loss, reference_loss(logits, targets))
    torch.testing.assert_close(head.logit_mean_square, logits.square().mean())
    (expected_hidden, expected_weight) = torch.autograd.grad(reference_loss(logits, targets), (hidden, weight))
    torch.testing.assert_close(hidden.grad, expected_hidden, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weight.grad, expected_weight, atol=1e-6, rtol=1e-5)
    assert not hidden.grad[0, :5].any()  # masked positions get no gradient

    # in bf16 autocast the logits are bf16 and everything reduced from them float32
    with torch.autocast("cpu", torch.bfloat16):
        fast = linear_cross_entropy(hidden, weight, targets)
        expected = reference_loss(torch.nn.functional.linear(hidden, weight), targets)
    assert fast.loss.dtype == torch.float32
    torch.testing.assert_close(fast.loss, expected, atol=1e-4, rtol=1e-4)


def test_loss_head_never_keeps_the_logits_for_backward():
    torch.manual_seed(0)
    hidden = torch.randn(512, 64, requires_grad=True)
    weight = torch.randn(256, 64, requires_grad=True)
    targets = torch.randint(0, 256, (512,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        linear_cross_entropy(hidden, weight, targets).loss.backward()
    # the two gradients, (512, 64) and (256, 64), and the count of targets; the logits would be 512 * 256
    assert sorted(saved) == [1, 256 * 64, 512 * 64]
    with torch.no_grad():  # evaluation takes no gradients at all
        assert linear_cross_entropy(hidden, weight, targets).loss.grad_fn is None


def test_loss_ignores_masked_targets():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 5, 16), torch.randn(11, 16)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :3] = IGNORE_INDEX
    expected = linear_cross_entropy(hidden, weight, targets).loss
    # whatever the model predicts at masked positions does not matter
    changed = hidden.clone()
    changed[0, :3] = 100.0
    torch.testing.assert_close(linear_cross_entropy(changed, weight, targets).loss, expected)
    # a fully masked batch is 0 with zero gradients, not nan
    hidden.requires_grad_()
    masked = linear_cross_entropy(hidden, weight, torch.full_like(targets, IGNORE_INDEX)).loss
    masked.backward()
    assert masked.item() == 0.0 and not hidden.grad.any()


def test_the_loss_of_the_trunk_and_chunked_head_equals_that_of_the_logits():
    torch.manual_seed(0)
    model = GPT(tiny())
    batch = python_bytes(3, 17)
    idx, targets = batch[:, :-1], batch[:, 1:].clone()
    targets[:, :4] = IGNORE_INDEX
    logits = model(idx)
    assert logits.shape == (3, 16, 256)
    loss = loss_of(model, idx, targets)
    torch.testing.assert_close(loss, reference_loss(logits, targets))
    # a fresh model predicts roughly uniformly
    assert abs(loss.item() - math.log(256)) < 0.3


def test_module_names_the_trainer_hooks_into_and_tying():
    tied, untied = GPT(tiny(tie_embeddings=True)), GPT(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    seen = []
    tied.norm_f.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
    tied(python_bytes(2, 8))
    assert seen == [(2, 8, 64)]


def test_init_weights_restarts_the_model_reproducibly():
    model = GPT(tiny())
    torch.manual_seed(1)
    model.init_weights()
    fresh = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    torch.manual_seed(1)
    model.init_weights()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, fresh[name]), name
    assert model.lm_head.weight is model.embed.weight


def test_mlp_hidden_defaults_to_8_thirds_rounded_up_to_64():
    assert mlp_hidden_size(tiny(d_model=384)) == 1024
    assert mlp_hidden_size(tiny(d_model=64)) == 192  # 170.7 -> 192
    assert mlp_hidden_size(tiny(d_model=100)) == 320  # 266.7 -> 320
    assert mlp_hidden_size(tiny(mlp_hidden=100)) == 100
    assert mlp_hidden_size(tiny(d_model=100, mlp="relu2")) == 448  # 4 x 100 -> 448: two matrices, not three


def test_relu2_mlp_is_relu_squared_of_up_then_down():
    mlp = GPT(tiny(mlp="relu2")).blocks[0].mlp
    assert not hasattr(mlp, "gate_proj")
    x = torch.randn(2, 5, 64)
    expected = mlp.down_proj(torch.relu(mlp.up_proj(x)) ** 2)
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": False},
        {"qk_norm": True, "n_kv_head": 1},
        {"mlp_hidden": 72, "n_kv_head": 0},
        {"mlp": "relu2"},
    ],
)
def test_param_count_formula_matches_the_built_model(overrides):
    config = tiny(**overrides)
    model = GPT(config)
    assert GPT.count_params(config) == model.num_params() == sum(p.numel() for p in model.parameters())
    vocab_matrices = (1 if config.tie_embeddings else 2) * config.vocab_size * config.d_model
    assert GPT.count_params(config, include_embedding=False) == model.num_params(include_embedding=False)
    assert model.num_params(include_embedding=False) == model.num_params() - vocab_matrices
    if config.n_kv_head == 0:  # 0 means one k/v head per query head
        assert model.blocks[0].attn.k_proj.weight.shape == (64, 64)


def test_flops_per_token_follows_nanogpt():
    config = tiny(tie_embeddings=True)
    model = GPT(config)
    attention = 12 * 2 * 4 * 16 * 48  # 12 L H Q T
    # tied: N is every parameter, exactly nanoGPT's estimate
    assert model.flops_per_token() == 6 * model.num_params() + attention
    # untied: the embedding table is a lookup and costs no FLOPs; lm_head does
    untied = GPT(tiny(tie_embeddings=False))
    assert untied.flops_per_token() == 6 * (untied.num_params() - 256 * 64) + attention


def test_residual_projections_start_smaller():
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=8, d_model=256, n_head=4, n_kv_head=4))
    block = model.blocks[3]
    scaled = 0.02 / math.sqrt(2 * 8)
    for weight, std in [
        (block.attn.q_proj.weight, 0.02),
        (block.mlp.up_proj.weight, 0.02),
        (model.embed.weight, 0.02),
        (block.attn.o_proj.weight, scaled),
        (block.mlp.down_proj.weight, scaled),
    ]:
        assert abs(weight.std().item() - std) < 0.05 * std
        assert abs(weight.mean().item()) < 0.05 * std
    assert torch.all(block.attn_norm.weight == 1) and torch.all(model.norm_f.weight == 1)


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True, "n_kv_head": 1}, {"n_kv_head": 4}])
def test_kv_cache_greedy_equals_recomputing_everything(overrides):
    torch.manual_seed(0)
    model = GPT(tiny(tie_embeddings=False, **overrides)).eval()
    # Large random weights: at the real init a tied model just repeats its last token, which a
    # broken cache would reproduce too.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.3)
    prompt = python_bytes(2, 7)
    cached = model.generate(prompt, max_new_tokens=30, temperature=0.0)
    assert cached.shape == (2, 37) and torch.equal(cached[:, :7], prompt)
    assert len(set(cached[0, 7:].tolist())) > 10
    assert torch.equal(cached, greedy_by_recompute(model, prompt, 30))

    # and the cached logits of every step equal those of one full forward pass
    caches = [KVCache(37) for _ in model.blocks]
    with torch.no_grad():
        steps = [model(cached[:, :7], kv_caches=caches)]
        steps += [model(cached[:, t : t + 1], kv_caches=caches) for t in range(7, 37)]
        full = model(cached)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-4, rtol=1e-4)  # logits are ~10 here


@pytest.mark.parametrize("n_kv_head", [1, 4])
def test_matmul_attention_equals_sdpa_in_loss_and_gradients(n_kv_head):
    batch = python_bytes(3, 33)
    results = {}
    for kernel in ("sdpa", "matmul"):
        torch.manual_seed(0)
        model = GPT(tiny(attention=kernel, n_kv_head=n_kv_head, qk_norm=True))
        loss = loss_of(model, batch[:, :-1], batch[:, 1:])
        loss.backward()
        results[kernel] = (loss.detach(), {name: p.grad for name, p in model.named_parameters()})
        with torch.autocast("cpu", torch.bfloat16):  # and in the dtype training on this CPU uses
            results[kernel + "_bf16"] = loss_of(model, batch[:, :-1], batch[:, 1:]).detach()
    (sdpa_loss, sdpa_grads), (matmul_loss, matmul_grads) = results["sdpa"], results["matmul"]
    torch.testing.assert_close(matmul_loss, sdpa_loss, atol=1e-6, rtol=1e-6)
    for name, grad in sdpa_grads.items():
        torch.testing.assert_close(matmul_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    torch.testing.assert_close(results["matmul_bf16"], results["sdpa_bf16"], atol=2e-2, rtol=0)


def test_matmul_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(tiny(attention="matmul")).eval()
    batch = python_bytes(1, 40)
    changed = batch.clone()
    changed[0, 30:] = 0  # a different future must not change the logits of the past
    with torch.no_grad():
        torch.testing.assert_close(model(batch)[:, :30], model(changed)[:, :30])


def test_top_k_one_and_tiny_top_p_are_greedy():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    prompt = python_bytes(2, 5)
    greedy = model.generate(prompt, 20, temperature=0.0)
    assert torch.equal(model.generate(prompt, 20, top_k=1, generator=torch.Generator().manual_seed(1)), greedy)
    assert torch.equal(model.generate(prompt, 20, top_p=1e-6, generator=torch.Generator().manual_seed(2)), greedy)
    # plain sampling is reproducible from its generator and differs from greedy
    first = model.generate(prompt, 20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, model.generate(prompt, 20, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(first, greedy)


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log().expand(4000, 4)
    generator = torch.Generator().manual_seed(0)
    top_k = sample_next_token(logits, top_k=2, generator=generator)
    assert set(top_k.tolist()) == {1, 3}
    # nucleus 0.7: token 1 (0.5) leaves 0.2 to reach, so token 3 (0.3) is in, token 2 is out
    top_p = sample_next_token(logits, top_p=0.7, generator=generator)
    assert set(top_p.tolist()) == {1, 3}
    assert abs((top_p == 1).float().mean().item() - 0.5 / 0.8) < 0.03  # renormalised over the nucleus
    assert set(sample_next_token(logits, top_p=0.81, generator=generator).tolist()) == {1, 2, 3}


def test_generation_stops_at_the_context_window_and_at_eot():
    torch.manual_seed(0)
    model = GPT(tiny(context_length=16)).eval()
    prompt = python_bytes(2, 10)
    assert model.generate(prompt, 50, temperature=0.0).shape == (2, 16)  # stopped at context_length
    assert torch.equal(model.generate(python_bytes(1, 16), 5), python_bytes(1, 16))

    def sample(prompt, **kwargs):
        return model.generate(prompt, 50, generator=torch.Generator().manual_seed(0), **kwargs)

    free = sample(prompt)
    eot = free[0, 12].item()
    assert eot not in free[0, 10:12].tolist() + free[1, 10:].tolist()  # true for this seed
    # row 0 ends at its eot and is padded with eot; row 1 never emits it and runs on unchanged
    stopped = sample(prompt, eot_id=eot)
    assert torch.equal(stopped[:, :13], free[:, :13])
    assert torch.all(stopped[0, 13:] == eot) and torch.equal(stopped[1], free[1])
    # once every row has emitted eot, generation ends
    same = prompt[:1].expand(2, 10)
    eot = model.generate(same, 1, temperature=0.0)[0, -1].item()
    assert model.generate(same, 50, temperature=0.0, eot_id=eot).shape == (2, 11)


def test_bad_sampling_arguments_are_user_errors():
    model = GPT(tiny(context_length=16))
    with pytest.raises(UserError, match="context_length"):
        model.generate(python_bytes(1, 17), 1)
    with pytest.raises(UserError, match="empty"):
        model.generate(python_bytes(1, 0), 1)
    for kwargs in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(UserError):
            model.generate(python_bytes(1, 4), 1, **kwargs)


def test_tiny_model_overfits_one_batch_of_python_source():
    torch.manual_seed(0)
    model = GPT(tiny(context_length=64))
    batch = python_bytes(8, 65)
    idx, targets = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(50):
        loss = loss_of(model, idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ln 256 = 5.5 at the start
    assert losses[-1] < 1.5, losses[::10]


def test_importing_the_model_does_not_import_transformers():
    code = "import sys, keel.models.gpt, keel.models.hf, keel.models.memory; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
