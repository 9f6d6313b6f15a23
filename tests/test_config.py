import pytest

from keel import config as config_lib
from keel.errors import UserError


def test_defaults_validate_and_overrides_apply():
    config = config_lib.load(None, ["optim.lr=1e-3", "train.compile=true", "model.n_layer=2"])
    assert config.optim.lr == 1e-3
    assert config.train.compile is True
    assert config.model.n_layer == 2


def test_file_round_trip(tmp_path):
    config = config_lib.load(None, ["model.d_model=128", "model.n_head=4", "model.n_kv_head=2", "name=x"])
    path = tmp_path / "c.yaml"
    config_lib.save(config, path)
    assert config_lib.load(path) == config


@pytest.mark.parametrize(
    "override, words",
    [
        (["optim.lrr=1"], "Did you mean optim.lr"),
        (["modle.n_layer=2"], "Did you mean model.n_layer"),
        (["optim.lr=-1"], "optim.lr must be positive"),
        (["model.n_head=5"], "must divide model.d_model"),
        (["model.n_kv_head=4"], "must divide model.n_head"),
        (["train.batch_size=two"], "train.batch_size must be a int"),
        (["train.dtype=float8"], "train.dtype must be"),
        (["optim.schedule=linear"], "optim.schedule must be"),
        (["optim.lr"], "is not KEY=VALUE"),
        (["train.max_steps=0"], "set train.max_steps or train.max_minutes"),
        (["train.max_steps=-5"], "train.max_steps, train.max_tokens and train.max_minutes must be >= 0"),
        (["train.max_minutes=inf"], "train.max_minutes must be a finite number"),
        (["optim.lr=.inf"], "optim.lr must be a finite number"),
        (["optim.lr=nan"], "optim.lr must be a finite number"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(override, words):
    with pytest.raises(UserError, match=words):
        config_lib.load(None, override)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        config_lib.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        config_lib.load(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  max_step: 3\n")
    with pytest.raises(UserError, match="Did you mean train.max_steps"):
        config_lib.load(unknown)
    for text, kind in (("- train\n- model\n", "list"), ("just words\n", "str")):
        not_a_mapping = tmp_path / "list.yaml"
        not_a_mapping.write_text(text)
        with pytest.raises(UserError, match=f"holds a {kind}, not a mapping of sections"):
            config_lib.load(not_a_mapping)


def test_reference_lists_every_key_with_help():
    rows = config_lib.reference()
    keys = {key for key, _, _ in rows}
    for required in ["data.path", "model.n_kv_head", "optim.warmup_steps", "train.max_minutes", "train.compile"]:
        assert required in keys
    assert all(help_text for _, _, help_text in rows)


def test_a_run_saved_by_an_older_keel_loads_without_the_settings_it_lost(tmp_path, capsys):
    """A key keel removed (supervisor.norm_init_ratio went in 0.1) in a run directory's config.yaml is
    dropped with a note; the same key in a config the user passes is refused."""
    from keel.runs.rundir import load_run_config

    (tmp_path / "config.yaml").write_text("supervisor:\n  norm_init_ratio: 1000.0\n  spike_window: 200\n")
    config = load_run_config(tmp_path)
    assert config.supervisor.spike_window == 200
    assert "supervisor.norm_init_ratio" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown config key supervisor.norm_init_ratio"):
        config_lib.load(tmp_path / "config.yaml")
