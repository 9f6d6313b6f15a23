import torch

from keel import config as config_lib
from keel.train.optim import build_optimizer, lr_at


def test_schedules_warm_up_then_end_at_the_floor():
    for schedule in ("cosine", "wsd"):
        c = config_lib.load(None, [f"optim.schedule={schedule}", "optim.warmup_steps=10", "optim.lr=1e-3"]).optim
        lrs = [lr_at(s, c, 100) for s in range(100)]
        assert lrs[0] == 1e-4 and lrs[9] == 1e-3  # linear warmup reaches the peak
        assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
        assert abs(lr_at(100, c, 100) - 1e-3 * c.min_lr_ratio) < 1e-12
    wsd = config_lib.load(None, ["optim.decay_fraction=0.2", "optim.warmup_steps=10"]).optim
    assert lr_at(79, wsd, 100) == wsd.lr  # stable phase holds the peak until the last 20%
    assert lr_at(90, wsd, 100) < wsd.lr


def test_no_weight_decay_on_norms_and_embeddings():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 4, bias=True))
    opt = build_optimizer(model, config_lib.load(None).optim)
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0
