"""Pretraining through the task seam trains exactly what the loop trained before the seam existed."""

import hashlib
import platform
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keel import config as config_lib
from keel.data import prepare
from keel.runs.rundir import init_run_dir
from keel.train.loop import train

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["argparse.py", "textwrap.py", "string.py", "shlex.py", "csv.py", "difflib.py"]
SETTINGS = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.context_length=64",
    "train.batch_size=4",
    "train.max_steps=20",
    "train.eval_every=10",
    "train.eval_batches=2",
    "train.checkpoint_every=10",
    "train.dtype=float32",
    "train.compile=false",
    "optim.warmup_steps=5",
    "optim.lr=3e-3",
    "optim.optimizer=adamw",  # the recorded loop trained with AdamW
    "optim.beta2=0.95",  # and its default beta2 then
]
# Recorded with the loop of commit 7f50700 (before the seam), on Python 3.11.7, torch 2.13.0, an AVX2-only
# AMD EPYC: grad_accum -> (sha256 of the final weights, val loss). Float kernels differ between CPU
# classes and library versions, so elsewhere only the val loss is compared, to 1e-4.
PINNED = {
    1: ("cb3d02b7a2ed1e92019370f75150d7f9c4c1b1ae176fac1d3cbea275ba2470f0", 5.420648813247681),
    3: ("4246ac8ad92705cd61be5c7e52ca426b3d7af4b3fe698e5282b7570ef5d45456", 5.364822626113892),
}


def _same_platform() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return (
        platform.python_version() == "3.11.7"
        and torch.__version__.startswith("2.13.0")
        and " avx2 " in flags
        and " avx512f " not in flags
    )


def weights_digest(run_dir: Path) -> str:
    weights = load_file(max(run_dir.glob("checkpoints/step_*")) / "model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("grad_accum", sorted(PINNED))
def test_pretraining_through_the_task_seam_is_bit_identical_to_the_loop_before_it(tmp_path, grad_accum):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in MODULES:
        shutil.copyfile(STDLIB / name, corpus / name)
    prepare([str(corpus)], tmp_path / "data", vocab_size=512, val_fraction=0.1, progress=False)
    config = config_lib.load(None, [f"data.path={tmp_path / 'data'}", *SETTINGS, f"train.grad_accum={grad_accum}"])
    run_dir = tmp_path / "run"
    result = train(init_run_dir(config, run_dir), run_dir, registry=None, progress=False)
    digest, val_loss = PINNED[grad_accum]
    assert result.steps == 20
    if _same_platform():
        assert weights_digest(run_dir) == digest
        assert result.val_loss == val_loss
    else:
        assert result.val_loss == pytest.approx(val_loss, abs=1e-4)
