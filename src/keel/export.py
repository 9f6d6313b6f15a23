"""`keel export`: a run's newest good checkpoint as a Hugging Face Llama directory or a llama.cpp GGUF file.

The export is written into a temporary sibling of --out (`.NAME.tmp-export`) and renamed into place
at the end, so a directory named --out is always a complete export. Its `keel_export.json` marker
records what it came from (run, step, checkpoint hash, dtype, format); an export may replace an
earlier export, never any other non-empty directory. The weights are read onto the CPU in float32
and cast once, so an export made here loads the same on a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from keel.data.chat import CHAT_TOKENS, END, jinja_template
from keel.data.tokenizer import EOT
from keel.errors import UserError
from keel.train.checkpoint import fsync

MARKER = "keel_export.json"
FORMATS = ("hf", "gguf")
DTYPES = ("float32", "bfloat16", "float16")
GGUF_FILE = "model.gguf"
ADAPTER_DIR = "adapter"  # --adapters: PEFT's adapter_config.json + adapter_model.safetensors


@dataclass
class ExportResult:
    out: Path
    format: str
    dtype: str
    int8: bool
    step: int
    files: list[str]
    num_bytes: int  # of all files written
    chat: bool  # whether the chat template went in


def export_run(
    run_dir: Path, out: Path, dtype: str = "float32", fmt: str = "hf", int8: bool = False, adapters: bool = False
) -> ExportResult:
    """Export the newest good checkpoint of run_dir into the directory out (see the module docstring).

    A LoRA run exports with its adapters folded into the weights; adapters=True instead writes its base
    (the weights the adapters go on) with the adapters beside it in PEFT's format, in out/adapter."""
    from keel.inference import load_run
    from keel.models.hf import llama_config
    from keel.train.checkpoint import weights_sha256

    run_dir, out = Path(run_dir), Path(out)
    assert fmt in FORMATS and dtype in DTYPES, (fmt, dtype)  # argparse's choices
    if int8 and fmt != "gguf":
        raise UserError(
            "--int8 export needs --format gguf (Q8_0): a Hugging Face directory has no int8 weight format that "
            "transformers loads without extra packages; export float and quantize at load time, or use --format gguf."
        )
    _check_output(run_dir, out)
    run = load_run(run_dir, device="cpu")
    if adapters and not run.config.lora.rank:
        raise UserError(f"--adapters exports a LoRA run's adapters, and {run_dir} has none; leave out --adapters.")
    if adapters and fmt != "hf":
        raise UserError("--adapters goes with --format hf: PEFT loads adapters onto a Hugging Face model.")
    if adapters and run.config.model.mlp == "relu2":
        raise UserError(
            f"{run_dir} has a model.mlp=relu2 MLP, exported as Llama's gated MLP with gate = up, which PEFT "
            "adapters on up_proj alone would break; leave out --adapters to export the merged weights."
        )
    llama_config(run.config.model)  # a model Llama cannot express (qk_norm) is refused before anything is written
    if fmt == "gguf" and run.config.model.mlp != "swiglu":
        raise UserError(
            f"{run_dir} has a model.mlp={run.config.model.mlp} MLP and GGUF's llama architecture only a SiLU-gated "
            "one, so llama.cpp could not run it; export it with --format hf."
        )
    checkpoint = run.checkpoint
    assert checkpoint is not None
    checkpoint_sha256 = weights_sha256(checkpoint)
    chat = all(run.tokenizer.token_to_id(token) is not None for token in (EOT, *CHAT_TOKENS))

    tmp = out.parent / f".{out.name}.tmp-export"
    _remove(tmp)  # left by an export that was killed
    try:
        tmp.mkdir(parents=True)
        if adapters:
            run = dataclasses.replace(run, model=_base_with_adapters(run, tmp / ADAPTER_DIR))
        _write(run, tmp, getattr(torch, dtype), fmt, int8, chat)
        marker = {
            "format": fmt,
            "dtype": dtype,
            "int8": int8,
            "run": str(run_dir.resolve()),
            "run_name": run.config.name,
            "step": run.step,
            "checkpoint": checkpoint.name,
            "checkpoint_sha256": checkpoint_sha256,
            "chat_template": chat,
            "adapters": ADAPTER_DIR if adapters else None,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        for path in tmp.iterdir():
            fsync(path)
        fsync(tmp)
    except OSError as err:  # a full disk, a quota, no permission: the earlier export (if any) is untouched
        _remove(tmp)
        raise UserError(
            f"could not write the export next to {out} ({err.strerror or err}); free space or choose another --out "
            "(nothing was changed)."
        ) from None
    except BaseException:
        _remove(tmp)
        raise
    # A directory cannot be renamed over a non-empty one, so the earlier export steps aside first.
    old = out.parent / f".{out.name}.old-export"
    _remove(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    fsync(out.parent)
    _remove(old)
    files = sorted(p.name for p in out.iterdir())
    return ExportResult(out, fmt, dtype, int8, run.step, files, sum((out / f).stat().st_size for f in files), chat)


def _base_with_adapters(run, adapter_dir: Path):
    """The LoRA run's base model (to export), after writing the run's adapters in PEFT's format."""
    import copy

    from keel.models.gpt import GPT
    from keel.models.lora import lora_for_run, write_peft_adapter
    from keel.tasks.lm import load_init_weights
    from keel.train import checkpoint as ckpt

    base = GPT(run.config.model)
    load_init_weights(base, Path(run.config.init.from_))
    adapted = copy.deepcopy(base)
    lora_for_run(adapted, run.config)
    ckpt.load_checkpoint(run.checkpoint, adapted)
    write_peft_adapter(adapted, run.config.lora, adapter_dir)
    return base.eval()


def _write(run, out: Path, dtype: torch.dtype, fmt: str, int8: bool, chat: bool) -> None:
    from keel.models.hf import SpecialTokens, write_hf_dir
    from keel.models.llamacpp import write_gguf

    model, tokenizer = run.model, run.tokenizer
    eot_id = tokenizer.token_to_id(EOT)
    # A chat-tuned model ends its turn with <|end|>; keel's chat also stops at <|endoftext|>.
    end_id = tokenizer.token_to_id(END) if chat else None
    special = SpecialTokens(
        bos=EOT,
        eos=END if chat else EOT,
        pad=EOT,
        bos_id=eot_id,
        eos_ids=(end_id, eot_id) if chat else (eot_id,),
        pad_id=eot_id,
    )
    template = jinja_template() if chat else None
    if fmt == "hf":
        write_hf_dir(model, tokenizer, out, dtype=dtype, special=special, chat_template=template)
    else:
        write_gguf(
            model,
            tokenizer,
            out / GGUF_FILE,
            dtype=dtype,
            int8=int8,
            name=run.config.name or run.path.name,
            bos_id=eot_id,
            eos_id=special.eos_ids[0],
            pad_id=eot_id,
            chat_template=template,
        )


def _check_output(run_dir: Path, out: Path) -> None:
    """One sentence for an --out that an export must not write to; reads only."""
    if out.resolve() == run_dir.resolve():
        raise UserError(f"--out {out} is the run directory itself; pass a new directory for the export.")
    if run_dir.resolve().is_relative_to(out.resolve()):
        raise UserError(f"--out {out} contains the run directory {run_dir}; pass a new directory for the export.")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory for the export.")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(
            f"--out {out} exists and is not an earlier keel export (it has no {MARKER}); "
            "pass a new or empty directory, or remove it first."
        )


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
