import copy
import sysconfig
from pathlib import Path

import pytest
import torch

from keel.config import ModelConfig
from keel.models.gpt import GPT
from keel.models.memory import apply_activation_checkpointing
from keel.tasks.lm import token_loss


def test_activation_checkpointing_keeps_loss_and_gradients():
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(n_layer=3, n_head=4, n_kv_head=2, d_model=64, context_length=32, vocab_size=256, qk_norm=True)
    )
    checkpointed = copy.deepcopy(model)
    apply_activation_checkpointing(checkpointed)
    data = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_bytes()[: 4 * 33]
    batch = torch.tensor(list(data), dtype=torch.long).view(4, 33)

    for m in (model, checkpointed):
        loss = token_loss(m, {"inputs": batch[:, :-1], "targets": batch[:, 1:]}).loss
        loss.backward()
        m.loss = loss.detach()
    assert torch.equal(model.loss, checkpointed.loss)
    assert model.state_dict().keys() == checkpointed.state_dict().keys()  # names unchanged
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-7, msg=name)

    # it really recomputes: the blocks run again during backward
    calls = []
    checkpointed.blocks[0].attn.q_proj.register_forward_hook(lambda *args: calls.append(1))
    token_loss(checkpointed, {"inputs": batch[:, :-1], "targets": batch[:, 1:]}).loss.backward()
    assert len(calls) == 2

    with pytest.raises(AssertionError, match="already"):
        apply_activation_checkpointing(checkpointed)
