"""train.tensorboard=true: the run's metrics and interventions in TensorBoard's own format, read back by TensorBoard."""

from conftest import run
from tensorboard.backend.event_processing.event_accumulator import SCALARS, TENSORS, EventAccumulator


def test_tensorboard_event_files_hold_the_metrics_and_the_interventions(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_FAULTS", "nan@7")  # a NaN step: the supervisor skips its update
    run_dir = tmp_path / "run"
    result = run(run_dir, f"data.path={tiny_data}", "train.tensorboard=true", *TINY_MODEL)
    assert result.status == "finished"

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={SCALARS: 0, TENSORS: 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "interventions"} <= scalars
    # A point per step the loop ran: step 7 twice, its skipped NaN update and the one after; evaluations at 10, 20, 30.
    steps = [e.step for e in events.Scalars("loss")]
    assert sorted(steps) == sorted([*range(30), 7])
    assert [e.step for e in events.Scalars("val_loss")] == [10, 20, 30]
    assert all(e.value > 0 for e in events.Scalars("tokens_per_s"))
    assert [(e.step, e.value) for e in events.Scalars("interventions")] == [(7, 1.0)]
    texts = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("logbook/text_summary")]
    assert any("action skip_update" in text for text in texts), texts
    assert any("info run_end" in text for text in texts), texts


def test_no_tensorboard_files_by_default(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    assert run(run_dir, f"data.path={tiny_data}", *TINY_MODEL, "train.max_steps=5").status == "finished"
    assert not (run_dir / "tensorboard").exists()


TINY_MODEL = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.n_kv_head=2", "model.context_length=64"]
