"""The run directory: the resolved config and tokenizer that make a run self-describing.

`runs/<name>/` holds `config.yaml`, `tokenizer.json` (a diffusion run: `images.json` and `samples/`),
`checkpoints/`, `logbook.jsonl`, `heartbeat.json` and `keel.lock`; metrics and events live in the
registry. keel only ever writes into a directory that is new, empty, or one of its own runs.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from keel import config as config_lib
from keel.config import ModelConfig, RunConfig, resolve_optimizer
from keel.data import open_data
from keel.data.examples import open_examples
from keel.errors import UserError

CONFIG_FILE = "config.yaml"
LOCK_FILE = "keel.lock"
TOKENIZER_FILE = "tokenizer.json"
IMAGES_FILE = "images.json"  # a diffusion run's image shape and class names, in place of a tokenizer
LOGBOOK_FILE = "logbook.jsonl"


def default_run_dir(config: RunConfig, config_path: str | Path | None) -> Path:
    name = config.name or (Path(config_path).stem if config_path else "run")
    return Path("runs") / name


def has_checkpoints(run_dir: Path) -> bool:
    return any(p.name.startswith("step_") for p in (run_dir / "checkpoints").glob("step_*"))


def is_run_dir(run_dir: Path) -> bool:
    """Whether keel wrote this directory: its lock file, or (from before the lock) config + checkpoints/logbook."""
    run_dir = Path(run_dir)
    if (run_dir / LOCK_FILE).is_file():
        return True
    return (run_dir / CONFIG_FILE).is_file() and (
        (run_dir / "checkpoints").is_dir() or (run_dir / LOGBOOK_FILE).is_file()
    )


def resolve_run(config: RunConfig, run_dir: Path, new_data: bool = False) -> RunConfig:
    """The config resolved against its data (name and vocab size filled in), or a UserError when it
    cannot train in run_dir. Reads only: a refused command leaves nothing behind.

    Only the model shape, the optimizer and the data must match an existing run: changing e.g.
    train.max_steps to extend a run is allowed, and so is other data when new_data says so.
    """
    _check_run_dir(run_dir, Path(config.data.path))
    data = open_task_data(config)
    model = init_model_config(config) if config.init.from_ else config.model
    if config.task.kind == "diffusion":
        from keel.tasks.diffusion import check_data

        check_data(config, data)  # images have no vocabulary; the patch size must fit them
    elif model.vocab_size == 0:
        model = dataclasses.replace(model, vocab_size=data.vocab_size)
    elif model.vocab_size < data.vocab_size:
        raise UserError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer of {config.data.path} "
            f"({data.vocab_size}); set model.vocab_size=0 to take it from the data."
        )
    resolved = dataclasses.replace(config, name=config.name or run_dir.name, model=model)
    config_lib.validate(resolved)
    if resolved.task.kind == "distill":
        from keel.tasks.distill import open_teacher

        open_teacher(resolved)  # a teacher that cannot teach this student is refused before anything is written
    if resolved.lora.rank:  # a target that matches no layer is refused before anything is written
        import torch

        from keel.models.gpt import GPT
        from keel.models.lora import apply_lora

        with torch.device("meta"):
            apply_lora(GPT(resolved.model), resolved.lora, base_vocab=resolved.model.vocab_size)

    if (run_dir / CONFIG_FILE).exists() and has_checkpoints(run_dir):
        previous = load_run_config(run_dir)
        # The attention kernel computes the same function, so it may change; the shape may not.
        changed = [
            f"model.{key} {old!r} -> {new!r}"
            for key, old in dataclasses.asdict(previous.model).items()
            if key != "attention" and (new := getattr(resolved.model, key)) != old
        ]
        if resolved.task.kind == "diffusion":  # these shape the DiT and what its output means
            changed += [
                f"diffusion.{key} {old!r} -> {new!r}"
                for key in ("patch_size", "objective")
                if (old := getattr(previous.diffusion, key)) != (new := getattr(resolved.diffusion, key))
            ]
        if changed:
            raise UserError(
                f"{run_dir} holds checkpoints of a model with a different shape ({', '.join(changed)}); "
                "use a new --run-dir or restore the run's model settings."
            )
        # A different optimizer could not load the saved optimizer state.
        now, before = resolve_optimizer(resolved).optimizer, resolve_optimizer(previous).optimizer
        if now != before:
            raise UserError(
                f"{run_dir} was trained with optim.optimizer={before}, not {now}; "
                "resume it with the same optimizer or use a new --run-dir."
            )
        if not new_data:
            _check_same_data(run_dir, Path(config.data.path))
        if resolved.lora.rank != previous.lora.rank:
            raise UserError(
                f"{run_dir} was trained with lora.rank={previous.lora.rank}, not {resolved.lora.rank}; "
                "resume it with the same lora settings or use a new --run-dir."
            )
        if resolved.lora.rank:
            from keel.models.lora import check_base
            from keel.train import checkpoint as ckpt

            newest = ckpt.list_checkpoints(run_dir)[-1]
            check_base(ckpt.read_meta(newest).get("lora_base"), Path(config.init.from_), run_dir)
    return resolved


def write_run_dir(config: RunConfig, run_dir: Path) -> None:
    """Write the resolved config and the data's tokenizer (a diffusion run: its images' shape) into run_dir
    (which must exist), and mark it as keel's (an empty lock file, which `keel train` takes while it runs)."""
    (run_dir / LOCK_FILE).touch(exist_ok=True)
    tmp = run_dir / f".{CONFIG_FILE}.tmp"
    config_lib.save(config, tmp)
    os.replace(tmp, run_dir / CONFIG_FILE)
    if config.task.kind == "diffusion":  # images have no tokenizer; the model's shape depends on theirs
        manifest = json.loads((Path(config.data.path) / "manifest.json").read_text())
        shape = {key: manifest[key] for key in ("channels", "height", "width", "num_classes", "class_names")}
        tmp = run_dir / f".{IMAGES_FILE}.tmp"
        tmp.write_text(json.dumps(shape, indent=2) + "\n")
        os.replace(tmp, run_dir / IMAGES_FILE)
        return
    tmp = run_dir / f".{TOKENIZER_FILE}.tmp"
    shutil.copyfile(Path(config.data.path) / TOKENIZER_FILE, tmp)
    os.replace(tmp, run_dir / TOKENIZER_FILE)


def init_run_dir(config: RunConfig, run_dir: Path) -> RunConfig:
    """resolve_run + write_run_dir, for training in this process (tests, benches); `keel train`
    also claims the directory in between (`claim_run_dir`)."""
    resolved = resolve_run(config, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_dir(resolved, run_dir)
    return resolved


def _check_run_dir(run_dir: Path, data_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file, not a directory; pass a directory for the run.")
    if run_dir.exists() and data_dir.exists() and run_dir.resolve() == data_dir.resolve():
        raise UserError(f"--run-dir {run_dir} is the data directory; pass another directory for the run.")
    if run_dir.is_dir() and not is_run_dir(run_dir):
        theirs = sorted(p.name for p in run_dir.iterdir())
        if theirs:
            raise UserError(
                f"--run-dir {run_dir} already holds files keel did not write ({', '.join(theirs[:3])}"
                f"{', ...' if len(theirs) > 3 else ''}); pass a new or empty directory."
            )


def data_identity(data_dir: Path) -> str:
    """sha256 of the data directory's manifest, which lists every file's own sha256: same data, same identity."""
    return hashlib.sha256((Path(data_dir) / "manifest.json").read_bytes()).hexdigest()


def _check_same_data(run_dir: Path, data_dir: Path) -> None:
    """Resuming on other data or another tokenizer is refused: the run would silently become another run."""
    ours, theirs = run_dir / TOKENIZER_FILE, data_dir / TOKENIZER_FILE
    if ours.is_file() and json.loads(ours.read_text()) != json.loads(theirs.read_text()):
        raise UserError(
            f"{data_dir} was tokenized with another tokenizer than the run in {run_dir}; resume on the run's own "
            "data, or pass --new-data to switch on purpose."
        )
    from keel.train import checkpoint as ckpt

    latest = ckpt.list_checkpoints(run_dir)
    try:
        recorded = json.loads((latest[-1] / ckpt.META).read_text()).get("data_identity")
    except (OSError, ValueError, AttributeError):
        recorded = None  # a damaged checkpoint is passed over when loaded; the tokenizer check still held
    if recorded is not None and recorded != data_identity(data_dir):
        raise UserError(
            f"{data_dir} is not the data the run in {run_dir} was trained on; resume on the same data, "
            "or pass --new-data to continue on this data on purpose."
        )


class RunClaim:
    """The OS lock that makes one `keel train` the owner of a run directory while it lives.

    flock on RUN_DIR/keel.lock: the kernel releases it when the last process holding the descriptor
    exits, however it exits, so a crash never leaves a stale lock; the PID written inside only names
    the owner in messages. `previous_owner` is the PID of an owner that died without releasing.
    """

    def __init__(self, run_dir: Path):
        path = Path(run_dir) / LOCK_FILE
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner_of(self.fd, Path(run_dir))
            os.close(self.fd)
            raise UserError(
                f"{run_dir} is in use by another keel train ({owner}); stop it first or pass another --run-dir."
            ) from None
        self.previous_owner = _read_pid(self.fd)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": os.getpid(), "since": time.time()}).encode(), 0)

    def release(self) -> None:
        os.ftruncate(self.fd, 0)  # an empty lock file: ended cleanly, nobody to take over from
        os.close(self.fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(json.loads(os.pread(fd, 4096, 0))["pid"])
    except (ValueError, KeyError, TypeError):
        return None


def _owner_of(fd: int, run_dir: Path) -> str:
    """'PID 123, trainer PID 456' for the message that refuses a second owner."""
    pid = _read_pid(fd)
    parts = [f"PID {pid}" if pid else "PID unknown"]
    try:
        trainer = json.loads((run_dir / "heartbeat.json").read_text()).get("pid")
    except (OSError, ValueError, AttributeError):
        trainer = None
    if trainer and trainer != pid:
        parts.append(f"trainer PID {trainer}")
    return ", ".join(parts)


# the data each task.kind trains on
DATA_KIND = {"pretrain": None, "sft": "sft", "dpo": "pref", "distill": None, "diffusion": "images"}


def open_task_data(config: RunConfig):
    """The data dir of config.data.path, checked to be of the kind the task trains on."""
    kind = DATA_KIND[config.task.kind]
    path = Path(config.data.path)
    if kind == "images":
        from keel.data.images import open_images

        return open_images(path)
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
    return config_lib.load(path, saved=True)
