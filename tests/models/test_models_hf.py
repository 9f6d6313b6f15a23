import pytest
import torch

from keel.config import ModelConfig
from keel.errors import UserError
from keel.models.gpt import GPT
from keel.models.hf import from_llama_state_dict, llama_config, to_llama_state_dict
from keel.tasks.lm import token_loss

transformers = pytest.importorskip("transformers")


def tiny(**overrides) -> ModelConfig:
    fields = dict(
        n_layer=2, n_head=4, n_kv_head=2, d_model=64, context_length=32, vocab_size=97, rope_theta=500.0, norm_eps=1e-6
    )
    return ModelConfig(**{**fields, **overrides})


def randomised_gpt(config: ModelConfig) -> GPT:
    """A GPT whose norm weights are not all 1, so a mis-mapped norm cannot hide."""
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
    return model


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@pytest.mark.parametrize("mlp", ["swiglu", "relu2"])
def test_logits_equal_hugging_face_llama(tie, n_kv_head, mlp):
    """relu2 goes out as Llama's gated MLP with a ReLU and gate = up: relu(a) * a = relu(a)^2."""
    config = tiny(tie_embeddings=tie, n_kv_head=n_kv_head, mlp=mlp)
    model = randomised_gpt(config).eval()
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config(config))).eval()
    result = llama.load_state_dict(to_llama_state_dict(model), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == (["lm_head.weight"] if tie else [])

    idx = torch.randint(0, 97, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)
        theirs = llama(idx).logits
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        # and the loss: Hugging Face shifts labels inside, keel's targets come shifted
        loss = token_loss(model, {"inputs": idx[:, :-1], "targets": idx[:, 1:]}).loss
        torch.testing.assert_close(loss, llama(idx, labels=idx).loss)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("mlp", ["swiglu", "relu2"])
def test_mapping_round_trips(tie, mlp):
    config = tiny(tie_embeddings=tie, mlp=mlp)
    model = randomised_gpt(config)
    back = from_llama_state_dict(to_llama_state_dict(model), config)
    assert back.keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():
        assert torch.equal(back[key], tensor), key
    # and a Hugging Face model's own state dict (tied ones repeat lm_head.weight) loads into GPT
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config(config)))
    if mlp == "relu2":  # as keel exports it: gate = up
        for layer in llama.model.layers:
            layer.mlp.gate_proj.weight = layer.mlp.up_proj.weight
    fresh = GPT(config)
    fresh.load_state_dict(from_llama_state_dict(llama.state_dict(), config))
    assert torch.equal(fresh.blocks[1].attn.k_proj.weight, llama.model.layers[1].self_attn.k_proj.weight)
    assert (fresh.lm_head.weight is fresh.embed.weight) == tie


def test_qk_norm_and_mismatched_weights_are_user_errors():
    with pytest.raises(UserError, match="qk_norm"):
        to_llama_state_dict(GPT(tiny(qk_norm=True)))
    with pytest.raises(UserError, match="qk_norm"):
        llama_config(tiny(qk_norm=True))
    state = to_llama_state_dict(GPT(tiny(n_layer=2)))
    with pytest.raises(UserError, match="do not fit"):
        from_llama_state_dict(state, tiny(n_layer=3))
    # a SwiGLU model's weights (gate != up) are not a relu2 model
    with pytest.raises(UserError, match="not a model.mlp=relu2 model"):
        from_llama_state_dict(state, tiny(n_layer=2, mlp="relu2"))
