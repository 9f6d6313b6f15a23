"""task.kind=diffusion on builtin:digits: it learns, resumes exactly, keeps its EMA through rollbacks, samples
deterministically, and the CLI serves it (sample, eval, report) and refuses what cannot work in one sentence."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error, keel, kill_at_checkpoint
from PIL import Image

from keel import config as config_lib
from keel.data import prepare
from keel.inference import load_diffusion_run
from keel.runs.registry import Registry
from keel.runs.rundir import init_run_dir
from keel.supervisor.logbook import read_logbook
from keel.tasks.diffusion import draw_noise, image_indices, sample_images
from keel.train.loop import Trainer, train

TINY_DIT = [
    "task.kind=diffusion",
    "model.n_layer=2",
    "model.d_model=32",
    "model.n_head=2",
    "diffusion.patch_size=2",
    "diffusion.grid_columns=2",
    "diffusion.sample_steps=4",
    "train.batch_size=32",
    "train.max_steps=30",
    "train.eval_every=10",
    "train.eval_batches=2",
    "train.checkpoint_every=10",
    "train.log_every=5",
    "train.dtype=float32",
    "train.compile=false",
    "optim.warmup_steps=5",
    "optim.lr=3e-3",
]


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "data"
    prepare(["builtin:digits"], out, progress=False)
    return out


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`keel ARGS` in this process (no torch import per call): exit code, stdout, stderr."""
    from keel.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(capsys, args: list[str], *words: str) -> None:
    code, _, err = cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for word in words:
        assert word in lines[0], (word, lines[0])


def dit_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    sets = [f"data.path={data}", *TINY_DIT, *extra]
    return ["train", "--run-dir", str(run_dir), *[arg for s in sets for arg in ("--set", s)]]


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    run_dir = tmp_path_factory.mktemp("runs") / "dit"
    result = keel(*dit_args(digits, run_dir), env={"KEEL_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    return run_dir, home


def test_a_short_run_learns_and_the_healthy_run_raises_no_signal(trained):
    run_dir, home = trained
    with Registry(home / "registry.sqlite") as registry:
        metrics = registry.metrics("dit")
    losses = [v for _, v in metrics["loss"]]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])  # it learns
    assert all(np.isfinite(v) for _, v in metrics["act_norm"])
    assert all(np.isfinite(v) for _, v in metrics["output_mean_square"])
    entries = read_logbook(run_dir / "logbook.jsonl")
    assert not [e for e in entries if e["kind"] in ("signal", "action")], entries  # nothing fired
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [f"step_{s:08d}.png" for s in (10, 20, 30)]
    assert (run_dir / "images.json").is_file() and not (run_dir / "tokenizer.json").exists()


def test_the_divergence_check_evaluates_the_loss_alone_without_a_sample_grid(digits, tmp_path):
    """A hair-trigger divergence test, so the supervisor asks the held-out loss often (its repairs are off,
    so the run goes on whatever it concludes): the grids are still only those of the scheduled evaluations."""
    hair_trigger = [
        "supervisor.divergence_span=6",
        "supervisor.divergence_patience=1",
        "supervisor.divergence_margin=0.002",
        "supervisor.rate_check_steps=0",
        "supervisor.rollback=false",
        "supervisor.lower_lr=false",
        "supervisor.reset_optimizer=false",
        "supervisor.stop_on_failure=false",
    ]
    run_dir = tmp_path / "run"
    config = init_run_dir(config_lib.load(None, [f"data.path={digits}", *TINY_DIT, *hair_trigger]), run_dir)
    assert train(config, run_dir, registry=None, progress=False).status == "finished"
    asked = [e for e in read_logbook(run_dir / "logbook.jsonl") if "val_rise" in e["evidence"]]
    assert asked, "the check never ran"
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [f"step_{s:08d}.png" for s in (10, 20, 30)]


def test_the_zero_initialised_output_growing_is_no_signal(digits, tmp_path):
    """adaLN-Zero starts the output at zero, so it grows a hundredfold in the first steps of a healthy run; the
    norm monitors watch the last block's activations, not the output (a logit monitor on it rolled this back)."""
    run_dir = tmp_path / "run"
    sets = [f"data.path={digits}", *TINY_DIT, "model.d_model=128", "model.n_layer=4", "model.n_head=4"]
    sets += ["optim.lr=1e-3", "optim.warmup_steps=50", "train.max_steps=20", "train.eval_every=20"]
    sets += ["train.checkpoint_every=20", "diffusion.grid_columns=0"]
    config = init_run_dir(config_lib.load(None, sets), run_dir)
    assert train(config, run_dir, registry=None, progress=False).status == "finished"
    assert not [e for e in read_logbook(run_dir / "logbook.jsonl") if e["kind"] in ("signal", "action")]


def test_batches_are_a_pure_function_of_seed_and_cursor():
    first = image_indices(100, 32, 7, 5)
    assert np.array_equal(first, image_indices(100, 32, 7, 5)) and not np.array_equal(
        first, image_indices(100, 32, 8, 5)
    )
    epoch = np.concatenate([image_indices(96, 32, 7, i) for i in range(3)])
    assert sorted(epoch.tolist()) == list(range(96))  # an epoch visits every image once
    noise, t, dropped = draw_noise("flow", (64, 1, 8, 8), 0.1, 7, 3)
    again = draw_noise("flow", (64, 1, 8, 8), 0.1, 7, 3)
    assert torch.equal(noise, again[0]) and torch.equal(t, again[1]) and torch.equal(dropped, again[2])
    # stratified: one t in each 1/64 quantile of the logit-normal
    quantiles = torch.special.ndtr(torch.logit(t.double())).sort().values
    assert torch.all((quantiles >= torch.arange(64) / 64) & (quantiles < (torch.arange(64) + 1) / 64))
    _, steps, _ = draw_noise("ddpm", (64, 1, 8, 8), 0.0, 7, 3)
    assert steps.min() >= 0 and steps.max() <= 999 and torch.equal(steps, steps.round())


def test_resume_after_sigkill_is_bit_exact(digits, trained, tmp_path):
    reference_dir, reference_home = trained
    home, run_dir = tmp_path / "home", tmp_path / "killed"
    args = [sys.executable, "-m", "keel.cli", *dit_args(digits, run_dir)]
    env = {**os.environ, "KEEL_HOME": str(home)}
    kill_at_checkpoint(args, run_dir, 10, env)
    assert not (run_dir / "checkpoints" / "step_00000030").exists()
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    final = "checkpoints/step_00000030"
    for name in ("model.safetensors", "state.pt"):  # state.pt holds the EMA weights
        ours = torch.load(run_dir / final / name, weights_only=True) if name == "state.pt" else None
        if ours is None:
            assert (run_dir / final / name).read_bytes() == (reference_dir / final / name).read_bytes()
        else:
            theirs = torch.load(reference_dir / final / name, weights_only=True)
            for key, value in ours["task"]["ema"]["weights"].items():
                assert torch.equal(value, theirs["task"]["ema"]["weights"][key]), key
    with Registry(home / "registry.sqlite") as a, Registry(reference_home / "registry.sqlite") as b:
        assert a.metrics("killed", "loss")["loss"] == b.metrics("dit", "loss")["loss"]
        assert len(a.segments("killed")) == 2


def test_a_rollback_restores_the_ema_of_the_checkpoint(digits, tmp_path, monkeypatch):
    from keel.supervisor.policy import Action, Supervisor

    real_observe, real_apply = Supervisor.observe, Trainer.apply
    seen = {}

    def observe(supervisor, record):
        actions = real_observe(supervisor, record)
        if record.step == 8 and not supervisor.repairs_used:
            supervisor.repairs_used += 1
            actions.append(Action("rollback", "test", {"before_step": 8, "skip_batches": 1}))
        return actions

    def apply(trainer, action):
        if action.kind == "rollback":
            seen["before"] = {k: v.clone() for k, v in trainer.task.ema.state_dict()["weights"].items()}
        out = real_apply(trainer, action)
        if action.kind == "rollback":
            seen["after"] = trainer.task.ema.state_dict()
            seen["step"] = trainer.state.step
        return out

    monkeypatch.setattr(Supervisor, "observe", observe)
    monkeypatch.setattr(Trainer, "apply", apply)
    run_dir = tmp_path / "run"
    config = init_run_dir(
        config_lib.load(None, [f"data.path={digits}", *TINY_DIT, "train.max_steps=12", "train.checkpoint_every=5"]),
        run_dir,
    )
    assert train(config, run_dir, registry=None, progress=False).status == "finished"
    assert seen["step"] == 5
    saved = torch.load(run_dir / "checkpoints" / "step_00000005" / "state.pt", weights_only=True)["task"]["ema"]
    assert seen["after"]["updates"].item() == 5 == saved["updates"].item()
    for name, value in saved["weights"].items():
        assert torch.equal(seen["after"]["weights"][name], value), name
    assert any(not torch.equal(seen["before"][n], v) for n, v in saved["weights"].items())  # it did move back


def test_an_injected_nan_is_skipped_and_the_ema_never_sees_it(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_FAULTS", "nan@6")
    run_dir = tmp_path / "run"
    config = init_run_dir(config_lib.load(None, [f"data.path={digits}", *TINY_DIT, "train.max_steps=15"]), run_dir)
    assert train(config, run_dir, registry=None, progress=False).status == "finished"
    entries = read_logbook(run_dir / "logbook.jsonl")
    assert [e["name"] for e in entries if e["kind"] == "signal"] == ["nonfinite"]
    assert [e["name"] for e in entries if e["kind"] == "action"] == ["skip_update"]
    run = load_diffusion_run(run_dir)
    assert run.step == 15 and all(torch.isfinite(p).all() for p in run.model.parameters())


def test_samplers_give_images_of_the_right_shape_the_same_for_the_same_seed(trained):
    run = load_diffusion_run(trained[0])
    for sampler in ("euler", "heun"):
        images = sample_images(run.model, "flow", 5, [0, 1, 2, 3, 4], sampler, steps=3, guidance=2.0, seed=1)
        assert images.dtype == np.uint8 and images.shape == (5, 1, 8, 8)
        assert np.array_equal(images, sample_images(run.model, "flow", 5, [0, 1, 2, 3, 4], sampler, 3, 2.0, seed=1))
        assert not np.array_equal(images, sample_images(run.model, "flow", 5, [0, 1, 2, 3, 4], sampler, 3, 2.0, 2))
    with pytest.raises(ValueError, match="does not fit a flow model"):
        sample_images(run.model, "flow", 2, sampler="ddim")
    with pytest.raises(ValueError, match="outside the model's classes"):
        sample_images(run.model, "flow", 1, [10])


def test_a_ddpm_run_samples_with_ddpm_and_ddim(digits, tmp_path):
    run_dir = tmp_path / "ddpm"
    sets = [
        f"data.path={digits}",
        *TINY_DIT,
        "diffusion.objective=ddpm",
        "train.max_steps=10",
        "diffusion.grid_columns=0",
    ]
    config = init_run_dir(config_lib.load(None, sets), run_dir)
    result = train(config, run_dir, registry=None, progress=False)
    assert result.status == "finished" and np.isfinite(result.val_loss)
    model = load_diffusion_run(run_dir).model
    for sampler in ("ddpm", "ddim"):
        images = sample_images(model, "ddpm", 3, None, sampler, steps=4, seed=0)
        assert images.shape == (3, 1, 8, 8)
        assert np.array_equal(images, sample_images(model, "ddpm", 3, None, sampler, steps=4, seed=0))


def test_keel_sample_eval_and_report_serve_a_diffusion_run(trained, tmp_path, capsys, monkeypatch):
    run_dir, home = trained
    monkeypatch.setenv("KEEL_HOME", str(home))
    out = tmp_path / "grid.png"
    code, stdout, err = cli(
        capsys, "sample", str(run_dir), "--out", str(out), "--columns", "3", "--steps", "2", "--guidance", "2"
    )
    assert code == 0, err
    assert "10 rows" in stdout and "step 30" in stdout
    with Image.open(out) as grid:  # 10 rows x 3 columns of 8x8 digits with 2-pixel gaps, enlarged 7 times
        assert grid.size == ((3 * 10 + 2) * 7, (10 * 10 + 2) * 7)
    code, stdout, err = cli(capsys, "eval", str(run_dir), "--samples", "40")
    assert code == 0 and "val loss" in stdout, err
    # the quality table: the samples beside the reference rows, with the caveat that this is not Inception
    assert "samples (step 30)" in stdout and "gaussian noise" in stdout and "not Inception" in stdout
    code, _, err = cli(capsys, "report", str(run_dir))
    assert code == 0, err
    page = (run_dir / "report" / "index.html").read_text()
    assert "Samples over training" in page and page.count("data:image/png;base64,") == 3 + 3


def test_bad_diffusion_inputs_are_one_sentence(digits, trained, tmp_path, capsys):
    run_dir, home = trained
    assert_refused(capsys, dit_args(digits, tmp_path / "r", "diffusion.patch_size=3"), "patch_size=3")
    assert_refused(capsys, dit_args(digits, tmp_path / "r", "diffusion.sampler=ddim"), "diffusion.sampler")
    assert not (tmp_path / "r").exists()  # refused before anything was written
    assert_refused(capsys, ["sample", str(run_dir), "--prompt", "def "], "--prompt")
    assert_refused(capsys, ["sample", str(run_dir), "--sampler", "ddpm"], "ddpm")
    assert_refused(capsys, ["sample", str(run_dir), "--out", str(tmp_path / "grid.jpg")], ".png")
    assert_refused(capsys, ["chat", str(run_dir)], "diffusion run")
    assert_refused(capsys, ["eval", str(run_dir), "--samples", "-1"], "--samples")
    # guidance needs classes: an unlabelled folder of images
    folder = tmp_path / "flat"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    prepare([str(folder)], tmp_path / "flat-data", progress=False)
    sets = [f"data.path={tmp_path / 'flat-data'}", *TINY_DIT, "train.max_steps=2", "train.batch_size=8"]
    assert_refused(capsys, dit_args(tmp_path / "flat-data", tmp_path / "x", "diffusion.guidance=2"), "unlabelled")
    flat_run = tmp_path / "flat-run"
    assert train(init_run_dir(config_lib.load(None, sets), flat_run), flat_run, None, progress=False).steps == 2
    assert_refused(capsys, ["sample", str(flat_run), "--guidance", "3"], "unlabelled")
    # the real command: exit code 2 and one sentence from a subprocess too
    assert_user_error(keel("sample", str(flat_run), "--guidance", "3"), "unlabelled")
