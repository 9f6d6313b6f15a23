"""`keel prepare` as a user runs it, in a subprocess: unreachable hubs, stop signals, folders it must not touch."""

import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import assert_user_error, keel, tiny_train_args


def test_an_unreachable_hub_fails_at_once_with_one_sentence(tmp_path):
    # A closed local port refuses at once, as an unreachable hub would after HUB_TIMEOUT_SECONDS;
    # the subprocess timeout keeps a regression from hanging the suite for minutes.
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}
    result = keel("prepare", "hf:someone/some-corpus", "--out", str(tmp_path / "out"), env=env, timeout=60)
    assert_user_error(result, "cannot reach the Hugging Face hub at http://127.0.0.1:9", "hf:someone/some-corpus")
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_force_refuses_a_folder_that_is_not_keel_data(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "manifest.json").write_text('{"name": "my web app"}')
    (tmp_path / "site" / "index.html").write_text("<p>hello</p>")
    result = keel("prepare", "builtin:python-stdlib", "--out", str(tmp_path / "site"), "--force")
    assert_user_error(result, f"{tmp_path / 'site'} exists and is not a keel data directory", "choose another --out")
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == ["index.html", "manifest.json"]


@pytest.mark.parametrize(
    ("signum", "code", "message", "inherit_ignored_sigint"),
    [
        (signal.SIGINT, 130, "interrupted", False),
        (signal.SIGTERM, 143, "interrupted (SIGTERM)", False),
        # A shell starts a background job (`keel prepare ... &` in a script) with SIGINT ignored.
        (signal.SIGINT, 130, "interrupted", True),
    ],
)
def test_stop_signals_end_prepare_cleanly(tmp_path, signum, code, message, inherit_ignored_sigint):
    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    process = subprocess.Popen(
        [sys.executable, "-m", "keel.cli", "prepare", "builtin:python-stdlib", "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ignore_sigint if inherit_ignored_sigint else None,
    )
    try:
        # The whole standard library takes prepare far longer than this to read, train on and encode.
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".out.*.tmp")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list(tmp_path.glob(".out.*.tmp")), "prepare ended or hung before creating its temporary folder"
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == message and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []  # neither the temporary folder nor a half-written DATA_DIR


def test_training_refuses_damaged_data_with_one_sentence(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns(".verified.json"))
    with open(data / "train.bin", "r+b") as f:
        f.truncate((data / "train.bin").stat().st_size - 1)
    result = keel(*tiny_train_args(data, tmp_path / "run"))
    assert_user_error(result, str(data / "train.bin"), "cut short", "keel prepare")
    (data / "manifest.json").write_text('{"format": "keel-data", "version": 1, "splits": ')
    result = keel(*tiny_train_args(data, tmp_path / "run"))
    assert_user_error(result, str(data / "manifest.json"), "damaged", "keel prepare")
