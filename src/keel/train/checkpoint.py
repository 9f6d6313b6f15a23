"""Checkpoints: atomic, checksummed directories that a run resumes or rolls back from.

A checkpoint is `RUN_DIR/checkpoints/step_{step:08d}/` holding

    model.safetensors   the weights (tied tensors stored once, re-tied on load); of a model with
                        frozen parameters (LoRA) only the trainable ones: the rest is the base run's
    state.pt            optimizer, RNG, data cursor, supervisor state... loadable with weights_only=True
    meta.json           step, tokens, val_loss, resolved config, keel version, save time
    MANIFEST.json       sha256 and size of the three files above

An FSDP run's checkpoint holds `sharded/` (torch.distributed.checkpoint: each rank's shards of the
weights and the optimizer state, plus its `.metadata`) instead of model.safetensors, and state.pt
without the optimizer; its MANIFEST lists every shard file. It loads at any world size, one process
included (DCP reshards on load), and an ordinary checkpoint loads into an FSDP run.

It is written into `.tmp-step_.../`, every file and the directory are fsynced, the directory is
renamed into place and the parent fsynced, so a crash leaves either a complete checkpoint or a
`.tmp-*` directory that is never read and is removed by the next save. Rank 0 writes the
checkpoint (under FSDP every rank first writes its shards into the temporary directory).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from keel.data.shards import sha256_file
from keel.errors import UserError

WEIGHTS = "model.safetensors"
STATE = "state.pt"
META = "meta.json"
MANIFEST = "MANIFEST.json"
CHECKSUMMED = (WEIGHTS, STATE, META)
SHARDED = "sharded"  # the directory of torch.distributed.checkpoint's files in an FSDP run's checkpoint
SHARDED_METADATA = f"{SHARDED}/.metadata"
_STEP_DIR = re.compile(r"step_(\d+)")


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    train_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
    sharded: bool = False,
) -> Path:
    """Write the checkpoint for `step` and prune old ones; returns its directory.

    `model` is the plain module (not the torch.compile / DDP wrapper), so parameter names stay
    stable. `meta` must be JSON-serialisable; `step`, `keel_version` and `saved_at` are added.
    An existing checkpoint for the same step is replaced. Pruning keeps the `keep_last` newest
    checkpoints plus the one with the lowest finite `meta["val_loss"]`, and deletes any with a
    step above `step`: after a rollback those belong to the abandoned timeline, and a later
    resume must not pick them up. `sharded`: every rank has written its shards (write_shards) and
    the weights are those, not model.safetensors.
    """
    assert step >= 0 and keep_last >= 1, (step, keep_last)
    root, final, tmp = _paths(run_dir, step)
    if not sharded:
        _clear_temporaries(root)
        tmp.mkdir()
    try:
        if sharded:
            assert (tmp / SHARDED_METADATA).is_file(), "write_shards comes first, on every rank"
        elif _has_frozen(model):
            trainable = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
            safetensors.torch.save_file(trainable, str(tmp / WEIGHTS))
        else:
            safetensors.torch.save_model(model, str(tmp / WEIGHTS))
        torch.save(train_state, tmp / STATE)
        # Prove now, not at resume time, that the state loads without executing code; mmap keeps
        # this cheap because no tensor data is read.
        try:
            torch.load(tmp / STATE, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            raise AssertionError(
                "train_state must hold only tensors, dicts, lists, tuples and plain Python scalars "
                f"(no numpy values or objects): {err}"
            ) from None
        meta = {**meta, "step": step, "keel_version": _keel_version(), "saved_at": time.time()}
        (tmp / META).write_text(json.dumps(meta, indent=2))
        names = [STATE, META, *_shard_files(tmp)] if sharded else list(CHECKSUMMED)
        manifest = {
            "files": {name: {"sha256": sha256_file(tmp / name), "size": (tmp / name).stat().st_size} for name in names}
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for name in (*names, MANIFEST):
            fsync(tmp / name)
        if sharded:
            fsync(tmp / SHARDED)
        fsync(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (safetensors.SafetensorError, RuntimeError)) and _WRITE_FAILED.search(str(err)):
            raise _as_os_error(err) from err
        raise

    # A directory cannot be renamed over a non-empty one, so the old copy steps aside first. A
    # crash between the two renames loses this step but no earlier checkpoint: resume falls back.
    replaced = root / f".tmp-replaced-{final.name}"
    if final.exists():
        final.rename(replaced)
    tmp.rename(final)
    fsync(root)
    shutil.rmtree(replaced, ignore_errors=True)
    _prune(run_dir, step, keep_last)
    return final


def _paths(run_dir: Path, step: int) -> tuple[Path, Path, Path]:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    return root, final, root / f".tmp-{final.name}"


def _clear_temporaries(root: Path) -> None:
    for stale in root.glob(".tmp-*"):  # left by a crash mid-write or mid-delete
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()


def _shard_files(path: Path) -> list[str]:
    return sorted(str(f.relative_to(path)) for f in (path / SHARDED).rglob("*") if f.is_file())


def is_sharded(path: Path) -> bool:
    return (Path(path) / SHARDED).is_dir()


def write_shards(run_dir: Path, step: int, model: nn.Module, optimizer, main: bool) -> bool:
    """Every rank of an FSDP run, before rank 0's save_checkpoint(sharded=True): this rank's shards of
    the weights and optimizer state into the step's temporary directory (a collective call).

    Returns whether the optimizer state went in: before the first update there is none, and asking
    DCP for it would make one (a zero-gradient step that counts as AdamW's first), so it stays out.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    root, _, tmp = _paths(run_dir, step)
    if main:
        _clear_temporaries(root)
        tmp.mkdir()
    dist.barrier()
    with_optimizer = bool(optimizer.state)
    if with_optimizer:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
    else:
        state = {"model": get_model_state_dict(model)}
    try:
        dcp.save(state, checkpoint_id=tmp / SHARDED)
    except Exception as err:  # DCP gathers every rank's failure and raises on all of them
        if _WRITE_FAILED.search(str(err)) or "No space" in str(err) or isinstance(err, OSError):
            raise _as_os_error(err) from err
        raise
    return with_optimizer


def load_into_sharded(path: Path, model: nn.Module, optimizer, device: torch.device) -> dict[str, Any]:
    """Load a checkpoint into a model and optimizer that may be sharded (FSDP) or plain, from sharded
    files (any world size: DCP reshards) or an ordinary checkpoint; returns the train_state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    path = Path(path)
    reason = verify_checkpoint(path)
    if reason:
        raise UserError(f"checkpoint {path} is corrupt ({reason}); load an earlier checkpoint from {path.parent}.")
    train_state = torch.load(path / STATE, map_location=device, weights_only=True)
    try:
        if is_sharded(path) and not train_state.get("optimizer_in_shards", True):  # saved before any update
            state = {"model": get_model_state_dict(model)}
            _dcp_load(state, path)
            set_model_state_dict(model, state["model"])
            optimizer.state.clear()
        elif is_sharded(path):
            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optim": optim_state}
            _dcp_load(state, path)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:  # an ordinary checkpoint (one process, or DDP) into an FSDP run: full tensors, sharded on load
            weights = safetensors.torch.load_file(path / WEIGHTS, device="cpu")
            for name, param in model.named_parameters(remove_duplicate=False):
                if name not in weights:  # a tied weight is stored once, under one of its names
                    twin = next(n for n, p in model.named_parameters() if p is param)
                    weights[name] = weights[twin]
            names = {id(p): n for n, p in model.named_parameters()}
            order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
            saved = train_state.pop("optimizer")
            if not saved["state"]:  # saved before any update: the optimizer starts afresh
                full = StateDictOptions(full_state_dict=True)
                set_model_state_dict(model, weights, options=full)
                optimizer.state.clear()
                return train_state
            optim_state = {
                "state": {order[i]: value for i, value in saved["state"].items()},
                "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]],
            }
            set_state_dict(
                model,
                optimizer,
                model_state_dict=weights,
                optim_state_dict=optim_state,
                options=StateDictOptions(full_state_dict=True),
            )
    except (RuntimeError, KeyError, ValueError, StopIteration) as err:
        detail = (str(err).splitlines() or [type(err).__name__])[0][:300]
        raise UserError(
            f"checkpoint {path} does not fit the model because the model's shape differs from the run's config "
            f"({detail}); resume with the config saved in the checkpoint's {META}, or start a new run directory."
        ) from None
    return train_state


# How safetensors ("I/O error: No space left on device (os error 28)") and torch.save ("iostream
# error", "file write failed") report a write the OS refused: a full disk is an OSError to the caller.
_WRITE_FAILED = re.compile(r"os error \d+|iostream error|write failed|failed writing", re.IGNORECASE)


def _as_os_error(err: Exception) -> OSError:
    match = re.search(r"os error (\d+)", str(err))
    code = int(match.group(1)) if match else errno.EIO
    return OSError(code, os.strerror(code))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, oldest step first (temporary directories excluded)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory was written at, from its name."""
    match = _STEP_DIR.fullmatch(Path(path).name)
    assert match, path
    return int(match.group(1))


def verify_checkpoint(path: Path) -> str | None:
    """None if every file matches the manifest, else a short reason such as "state.pt sha256 mismatch"."""
    path = Path(path)
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        for name in (STATE, META, SHARDED_METADATA) if SHARDED_METADATA in files else CHECKSUMMED:
            if name not in files:
                return f"{name} not listed in {MANIFEST}"
        for name, entry in files.items():
            file = path / name
            if not file.is_file():
                return f"{name} missing"
            size, expected = file.stat().st_size, entry["size"]
            if size < expected:
                return f"{name} truncated ({size} of {expected} bytes)"
            if size != expected:
                return f"{name} size mismatch ({size} bytes, manifest says {expected})"
            if sha256_file(file) != entry["sha256"]:
                return f"{name} sha256 mismatch"
    except FileNotFoundError:
        return f"{MANIFEST} missing"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} unreadable ({type(err).__name__})"
    return None


def load_checkpoint(
    path: Path, model: nn.Module, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify a checkpoint, load its weights into `model` (strict) and return (train_state, meta)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(
            f"checkpoint {path} does not exist; pass a directory such as RUN_DIR/checkpoints/step_00001000."
        )
    reason = verify_checkpoint(path)
    if reason:
        raise UserError(f"checkpoint {path} is corrupt ({reason}); load an earlier checkpoint from {path.parent}.")
    try:
        if is_sharded(path):
            model.load_state_dict(read_weights(path, map_location), strict=True)
        elif _has_frozen(model):
            _load_trainable(model, path / WEIGHTS, str(map_location))
        else:
            safetensors.torch.load_model(model, path / WEIGHTS, strict=True, device=str(map_location))
    except RuntimeError as err:
        # The first line is "Error(s) in loading state_dict for X:"; the next names the first problem.
        lines = str(err).splitlines()
        detail = (lines[1] if len(lines) > 1 else lines[0]).strip().rstrip(".")[:300]
        raise UserError(
            f"checkpoint {path} does not fit the model because the model's shape differs from the run's config "
            f"({detail}); resume with the config saved in the checkpoint's {META}, or start a new run directory."
        ) from None
    train_state = torch.load(path / STATE, map_location=map_location, weights_only=True)
    meta = json.loads((path / META).read_text())
    return train_state, meta


def weights_sha256(checkpoint: Path) -> str:
    """What identifies a checkpoint's weights: its model.safetensors' sha256 (as `sha256sum` prints it),
    or for an FSDP run's sharded checkpoint the sha256 of its shard files' names and sha256s (sorted)."""
    files = json.loads((checkpoint / MANIFEST).read_text())["files"]
    if WEIGHTS in files:
        return files[WEIGHTS]["sha256"]
    shards = sorted(f"{name} {entry['sha256']}\n" for name, entry in files.items() if name.startswith(f"{SHARDED}/"))
    return hashlib.sha256("".join(shards).encode()).hexdigest()


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's meta.json, or {} when it cannot be read (a damaged checkpoint is found and passed
    over when it is loaded)."""
    try:
        return json.loads((Path(checkpoint) / META).read_text())
    except (OSError, ValueError):
        return {}


def read_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A checkpoint's model weights by name, from model.safetensors or, in this one process, an FSDP run's
    shards (shaped as the shards' metadata says, so they need no model to load into: init.from a run of
    another vocabulary; keel sample, eval and export load them into a plain model)."""
    if not is_sharded(path):
        return safetensors.torch.load_file(path / WEIGHTS, device=str(device))
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(path / SHARDED)).read_metadata().state_dict_metadata
    state = {
        key.removeprefix("model."): torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in metadata.items()
        if key.startswith("model.") and isinstance(entry, TensorStorageMetadata)
    }
    _dcp_load({"model": state}, path)
    return {name: tensor.to(device) for name, tensor in state.items()}


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    """DCP's load in place into `state`; in one process without a process group (it reshards either way)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    alone = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path / SHARDED, no_dist=alone)


def _has_frozen(model: nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def _load_trainable(model: nn.Module, file: Path, device: str) -> None:
    """Load a checkpoint of the trainable parameters only: exactly those, nothing else."""
    state = safetensors.torch.load_file(file, device=device)
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise RuntimeError(
            f"Error(s) in loading the trainable parameters:\n missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.load_state_dict(state, strict=False)


def find_latest_good(
    run_dir: Path, before_step: int | None = None, healthy_only: bool = False
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint (with step < before_step, if given) that verifies, and the (checkpoint,
    reason) pairs of the newer ones that did not, so the caller can log why it fell back.

    healthy_only also passes over checkpoints whose meta says the supervisor saw trouble open when
    they were written (`"healthy": false`): a rollback must land before the trouble began.
    """
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(run_dir)):
        if before_step is not None and checkpoint_step(path) >= before_step:
            continue
        reason = verify_checkpoint(path)
        if reason is None and healthy_only and not json.loads((path / META).read_text()).get("healthy", True):
            continue
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def capture_rng_state() -> dict[str, Any]:
    """Python, torch CPU and (when present) CUDA generator states, as weights_only-loadable values."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state. CUDA states are skipped on a machine without CUDA."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    # Generator states must be CPU byte tensors even if the checkpoint was mapped to a GPU.
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------------------------------------
# helpers


def _prune(run_dir: Path, newest_step: int, keep_last: int) -> None:
    checkpoints = list_checkpoints(run_dir)
    timeline = [p for p in checkpoints if checkpoint_step(p) <= newest_step]
    keep = set(timeline[-keep_last:])
    scored = [(loss, checkpoint_step(p), p) for p in timeline if (loss := _val_loss(p)) is not None]
    if scored:
        keep.add(min(scored)[2])  # ties go to the earliest step
    for path in checkpoints:
        if path not in keep:
            # Rename first: a crash mid-delete then leaves a .tmp-* directory, not a half checkpoint.
            doomed = path.with_name(f".tmp-pruned-{path.name}")
            path.rename(doomed)
            shutil.rmtree(doomed)


def _val_loss(path: Path) -> float | None:
    try:
        loss = json.loads((path / META).read_text()).get("val_loss")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(loss, (int, float)) and math.isfinite(loss):
        return float(loss)
    return None


def fsync(path: Path) -> None:
    # Linux flushes a file's (or directory's) dirty data through any descriptor, even read-only.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _keel_version() -> str:
    try:
        return metadata.version("keel")
    except metadata.PackageNotFoundError:
        return "unknown"


def find_best(run_dir: Path) -> Path:
    """The verified checkpoint of a finished run to start another from: lowest val loss, else newest."""
    good = [p for p in list_checkpoints(run_dir) if verify_checkpoint(p) is None]
    if not good:
        raise UserError(f"{run_dir} has no usable checkpoint; train it first, or point init.from at another run.")
    scored = [(loss, checkpoint_step(p), p) for p in good if (loss := _val_loss(p)) is not None]
    return min(scored)[2] if scored else good[-1]
