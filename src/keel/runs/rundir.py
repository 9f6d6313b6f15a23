"""The run directory: the resolved config and tokenizer that make a run self-describing.

`runs/<name>/` holds `config.yaml`, `tokenizer.json`, `checkpoints/`, `logbook.jsonl` and
`heartbeat.json`; metrics and events live in the registry.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from keel import config as config_lib
from keel.config import ModelConfig, RunConfig
from keel.data import open_data
from keel.data.examples import open_examples
from keel.errors import UserError

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
LOGBOOK_FILE = "logbook.jsonl"


def default_run_dir(config: RunConfig, config_path: str | Path | None) -> Path:
    name = config.name or (Path(config_path).stem if config_path else "run")
    return Path("runs") / name


def has_checkpoints(run_dir: Path) -> bool:
    return any(p.name.startswith("step_") for p in (run_dir / "checkpoints").glob("step_*"))


def init_run_dir(config: RunConfig, run_dir: Path) -> RunConfig:
    """Resolve the config against its data, refuse an incompatible resume, write config + tokenizer.

    Returns the resolved config (name and vocab size filled in). Only the model shape and the optimizer must
    match an existing run: changing e.g. train.max_steps to extend a run is allowed.
    """
    data = open_task_data(config)
    model = init_model_config(config) if config.init.from_ else config.model
    if model.vocab_size == 0:
        model = dataclasses.replace(model, vocab_size=data.vocab_size)
    elif model.vocab_size < data.vocab_size:
        raise UserError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer of {config.data.path} "
            f"({data.vocab_size}); set model.vocab_size=0 to take it from the data."
        )
    resolved = dataclasses.replace(config, name=config.name or run_dir.name, model=model)
    config_lib.validate(resolved)

    if (run_dir / CONFIG_FILE).exists() and has_checkpoints(run_dir):
        previous = load_run_config(run_dir)
        # The attention kernel computes the same function, so it may change; the shape may not.
        changed = [
            f"model.{key} {old!r} -> {new!r}"
            for key, old in dataclasses.asdict(previous.model).items()
            if key != "attention" and (new := getattr(resolved.model, key)) != old
        ]
        if changed:
            raise UserError(
                f"{run_dir} holds checkpoints of a model with a different shape ({', '.join(changed)}); "
                "use a new --run-dir or restore the run's model settings."
            )
        # A different optimizer could not load the saved optimizer state.
        if resolved.optim.optimizer != previous.optim.optimizer:
            raise UserError(
                f"{run_dir} was trained with optim.optimizer={previous.optim.optimizer}, "
                f"not {resolved.optim.optimizer}; "
                "resume it with the same optimizer or use a new --run-dir."
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{CONFIG_FILE}.tmp"
    config_lib.save(resolved, tmp)
    os.replace(tmp, run_dir / CONFIG_FILE)
    shutil.copyfile(Path(config.data.path) / TOKENIZER_FILE, run_dir / TOKENIZER_FILE)
    return resolved


DATA_KIND = {"pretrain": None, "sft": "sft", "dpo": "pref"}  # the data each task.kind trains on


def open_task_data(config: RunConfig):
    """The data dir of config.data.path, checked to be of the kind the task trains on."""
    kind = DATA_KIND[config.task.kind]
    path = Path(config.data.path)
    return open_data(path) if kind is None else open_examples(path, kind=kind)


def init_model_config(config: RunConfig) -> ModelConfig:
    """The model of the init.from run, which this run continues: a shape set otherwise is refused,
    and so is data whose tokenizer is not that run's (it may add tokens at the end: the chat markers).
    The vocabulary size is left to the data (0)."""
    from tokenizers import Tokenizer

    from keel.train import checkpoint as ckpt

    init_dir = Path(config.init.from_)
    if not (init_dir / CONFIG_FILE).is_file():
        raise UserError(
            f"init.from={init_dir} is not a keel run directory (no {CONFIG_FILE}); "
            "point it at a directory `keel train` wrote."
        )
    init = load_run_config(init_dir)
    ckpt.find_best(init_dir)  # a clear sentence if it has no usable checkpoint
    default = config_lib.from_dict({}).model  # resolved the same way (n_kv_head 0 -> n_head)
    for key, ours in dataclasses.asdict(config.model).items():
        theirs = getattr(init.model, key)
        if key not in ("vocab_size", "attention") and ours != getattr(default, key) and ours != theirs:
            raise UserError(
                f"model.{key}={ours} does not match the init.from run {init_dir} (model.{key}={theirs}); "
                "the shape comes from that run: drop the model.* setting or start from another run."
            )
    init_vocab = Tokenizer.from_file(str(init_dir / TOKENIZER_FILE)).get_vocab(with_added_tokens=True)
    data_vocab = Tokenizer.from_file(str(Path(config.data.path) / TOKENIZER_FILE)).get_vocab(with_added_tokens=True)
    if any(data_vocab.get(token) != token_id for token, token_id in init_vocab.items()):
        raise UserError(
            f"{config.data.path} was tokenized with another tokenizer than the init.from run {init_dir}; "
            f"prepare it again with --tokenizer {init_dir}."
        )
    return dataclasses.replace(init.model, vocab_size=0, attention=config.model.attention)


def load_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(
            f"{run_dir} is not a keel run directory (no {CONFIG_FILE}); pass the directory `keel train` wrote."
        )
    return config_lib.load(path)
