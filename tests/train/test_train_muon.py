"""`keel train` with optim.optimizer=muon, end to end: it learns, and a stopped run resumes exactly."""

from conftest import keel, tiny_train_args

from keel.runs.registry import Registry

MUON = "optim.optimizer=muon"


def test_muon_run_learns_and_a_stopped_run_resumes_exactly(tiny_data, tmp_path, keel_home):
    reference = keel(*tiny_train_args(tiny_data, tmp_path / "reference", MUON))
    assert reference.returncode == 0, reference.stderr
    # 15 of the 30 steps (4 sequences of 64 tokens each); the stop writes a checkpoint.
    stopped = keel(*tiny_train_args(tiny_data, tmp_path / "stopped", MUON, "train.max_tokens=3840"))
    assert stopped.returncode == 0, stopped.stderr
    checkpoints = tmp_path / "stopped" / "checkpoints"
    assert (checkpoints / "step_00000015").is_dir() and not (checkpoints / "step_00000030").exists()
    resumed = keel(*tiny_train_args(tiny_data, tmp_path / "stopped", MUON))
    assert resumed.returncode == 0, resumed.stderr

    final = "checkpoints/step_00000030/model.safetensors"
    assert (tmp_path / "stopped" / final).read_bytes() == (tmp_path / "reference" / final).read_bytes()
    with Registry(keel_home / "registry.sqlite") as registry:
        losses = registry.metrics("reference", "loss")
        assert registry.metrics("stopped", "loss") == losses
        assert len(registry.segments("stopped")) == 2  # it really was resumed
    values = [v for _, v in losses["loss"]]
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5 - 0.5  # it learns
