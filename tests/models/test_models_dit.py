"""The DiT: adaLN-Zero starts every block as the identity and the output at zero; shapes; attention sees everything."""

import torch

from keel import config as config_lib
from keel.models.dit import DiT, DiTConfig, sincos_2d


def tiny(num_classes: int = 10, channels: int = 1) -> DiT:
    trunk = config_lib.load(None, ["model.n_layer=2", "model.d_model=32", "model.n_head=2"]).model
    torch.manual_seed(0)
    return DiT(DiTConfig(trunk, channels, 8, 12, 2, num_classes))


def test_the_untrained_model_outputs_exactly_zero_and_its_blocks_are_the_identity():
    model = tiny()
    x = torch.randn(3, 1, 8, 12)
    t, y = torch.tensor([0.0, 500.0, 999.0]), torch.tensor([0, 9, 10])  # 10: the null class
    assert torch.equal(model(x, t, y), torch.zeros(3, 1, 8, 12))
    hidden, c = model.hidden_states(x, t, y)
    tokens = model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_embed
    assert torch.equal(hidden, tokens)  # every gate starts at zero
    assert hidden.shape == (3, 8 // 2 * 12 // 2, 32) and c.shape == (3, 32)


def test_output_has_the_image_shape_and_each_patch_lands_in_place():
    model = tiny(num_classes=0, channels=3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    x, t = torch.randn(2, 3, 8, 12), torch.tensor([10.0, 20.0])
    assert model(x, t, torch.zeros(2, dtype=torch.long)).shape == (2, 3, 8, 12)
    # The final projection's bias alone: patch k's pixel (channel c, row i, column j) is bias[(i * P + j) * C + c].
    hidden = torch.zeros(1, 24, 32)
    with torch.no_grad():
        model.final_modulation.weight.zero_()
        model.final_modulation.bias.zero_()
        model.final_proj.weight.zero_()
        model.final_proj.bias.copy_(torch.arange(12.0))
    image = model.output(hidden, torch.zeros(1, 32))[0]  # (3, 8, 12)
    assert image[1, 0, 1].item() == (0 * 2 + 1) * 3 + 1 and image[2, 3, 4].item() == (1 * 2 + 0) * 3 + 2


def test_attention_is_not_causal_and_the_class_matters():
    model = tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    x, t, y = torch.randn(1, 1, 8, 12), torch.tensor([100.0]), torch.tensor([3])
    changed = x.clone()
    changed[..., -2:, -2:] += 1.0  # the last patch only
    first_patch = (slice(None), slice(None), slice(0, 2), slice(0, 2))
    assert not torch.equal(model(x, t, y)[first_patch], model(changed, t, y)[first_patch])
    assert not torch.equal(model(x, t, y), model(x, t, torch.tensor([4])))


def test_the_position_embedding_tells_every_patch_apart():
    grid = sincos_2d(32, 4, 6)
    assert grid.shape == (24, 32)
    assert torch.cdist(grid, grid).add(torch.eye(24)).min() > 0.1
