"""keel compare: two runs side by side, exactly what differs between them, and the bad inputs."""

import pytest
from conftest import TINY, run

from keel import config as config_lib
from keel.cli import main
from keel.errors import UserError
from keel.research.compare import compare_runs
from keel.runs.registry import Registry
from keel.runs.rundir import init_run_dir
from keel.train.loop import train


@pytest.fixture(scope="module")
def two_runs(tiny_data, tmp_path_factory):
    """Two tiny runs that differ in their learning rate only, trained with a registry."""
    home, root = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KEEL_HOME", str(home))
        for name, lr in (("fast", "3e-3"), ("slow", "1e-3")):
            sets = [*TINY, "train.compile=false", "train.max_steps=20", f"data.path={tiny_data}", f"optim.lr={lr}"]
            config = init_run_dir(config_lib.load(None, sets), root / name)
            with Registry() as registry:
                assert train(config, root / name, registry, progress=False).status == "finished"
    return home, root / "fast", root / "slow"


def test_compare_shows_exactly_the_config_difference_and_the_final_numbers(two_runs, tmp_path, monkeypatch):
    home, fast, slow = two_runs
    monkeypatch.setenv("KEEL_HOME", str(home))
    comparison = compare_runs([str(fast), "slow"], tmp_path / "cmp.html")  # a directory, or a name the registry knows
    assert comparison.differences == [("optim.lr", [0.003, 0.001])]
    lines = comparison.table.splitlines()
    assert lines[0].split()[:4] == ["run", "status", "steps", "tokens"]
    with Registry() as registry:
        for line, name in zip(lines[1:3], ("fast", "slow")):
            val = registry.metrics(name, "val_loss")["val_loss"]
            assert line.split()[:4] == [name, "finished", "20", "5.1k"]  # 20 steps x 4 x 64 tokens
            assert f"{val[-1][1]:.4f}" in line and line.endswith("none")  # final val loss; no interventions
    assert lines[-2].split() == ["config", "key", "fast", "slow"]
    assert lines[-1].split() == ["optim.lr", "0.003", "0.001"]
    page = comparison.page.read_text()
    assert page.count("src='data:image/png;base64,") == 1 and "<td>optim.lr</td>" in page


def test_the_cli_prints_the_table_and_writes_the_page(two_runs, tmp_path, monkeypatch, capsys):
    home, fast, slow = two_runs
    monkeypatch.setenv("KEEL_HOME", str(home))
    out = tmp_path / "pages" / "lr.html"
    assert main(["compare", str(fast), str(slow), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[-1] == f"wrote {out}" and "optim.lr" in stdout and out.is_file()


def test_bad_inputs_are_one_sentence_and_write_nothing(two_runs, tiny_data, tmp_path, monkeypatch, capsys):
    home, fast, slow = two_runs
    monkeypatch.setenv("KEEL_HOME", str(home))
    out = tmp_path / "cmp.html"
    cases = [
        ([str(fast)], "keel compare needs two runs or more, got 1"),
        ([str(fast), str(tmp_path)], f"{tmp_path} is not a keel run directory (no config.yaml)"),
        ([str(fast), "no-such-run"], "no-such-run is not a keel run directory"),
        ([str(fast), str(fast)], f"{fast} is given twice"),
    ]
    for runs, words in cases:
        assert main(["compare", *runs, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and "Traceback" not in err, err
    assert not out.exists()

    # A run the registry has no metrics for (here: trained without one); the message says how to load them.
    lost = tmp_path / "lost"
    run(lost, f"data.path={tiny_data}", *[s for s in TINY if s.startswith("model.")], "train.max_steps=4")
    with pytest.raises(UserError, match=rf"no metrics for run lost .*`keel runs --import {lost}`"):
        compare_runs([str(fast), str(lost)], out)
    assert not out.exists()
