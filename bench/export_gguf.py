"""Does llama.cpp run keel's GGUF export as keel runs the run? Tokens, logits and greedy text compared.

Exports RUN (float32, and Q8_0 with --int8 too) with `keel export --format gguf` into a temporary
directory, loads each file with llama-cpp-python, and for a few prompts compares:

- the prompt's tokens: llama.cpp's tokenizer (with its bos, keel's <|endoftext|>) against keel's;
- the logits at every prompt position: largest absolute difference to keel's float32 model;
- greedy continuations (temperature 0, no repetition penalty): how many tokens equal keel's before the
  first difference.

    pip install llama-cpp-python        # no binary wheel on PyPI for Linux: a source build (cmake, a C++ compiler)
    python bench/export_gguf.py --run runs/demo [--int8]

llama-cpp-python is not a keel dependency; without it this script says so and exits 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from keel.export import GGUF_FILE, export_run
from keel.inference import load_run
from keel.train.precision import describe_cpu

PROMPTS = ["import os\n", "def main(", 'class Config:\n    """', "    for i in range(len("]


def compare(llama_cls, path: Path, run, new_tokens: int) -> list[tuple[str, bool, float, int, int]]:
    llm = llama_cls(model_path=str(path), n_ctx=run.config.model.context_length, logits_all=True, verbose=False)
    eot = run.tokenizer.token_to_id("<|endoftext|>")
    rows = []
    for prompt in PROMPTS:
        ours = [eot] + run.tokenizer.encode(prompt).ids
        theirs = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        llm.reset()
        llm.eval(ours)
        their_logits = np.asarray(llm.scores[: len(ours)], dtype=np.float64)
        with torch.no_grad():
            our_logits = run.model(torch.tensor([ours]))[0].double().numpy()
            length = min(new_tokens, run.config.model.context_length - len(ours))
            our_greedy = run.model.generate(torch.tensor([ours]), length, temperature=0)[0, len(ours) :].tolist()
        llm.reset()
        their_greedy = []
        for token in llm.generate(ours, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            their_greedy.append(token)
            if len(their_greedy) == length:
                break
        same = next((i for i, (a, b) in enumerate(zip(our_greedy, their_greedy)) if a != b), length)
        rows.append((prompt, theirs == ours, float(np.abs(their_logits - our_logits).max()), same, length))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a keel run (pretraining or chat-tuned)")
    parser.add_argument("--int8", action="store_true", help="also the Q8_0 export")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed (pip install llama-cpp-python builds it from source).")
        sys.exit(1)
    import llama_cpp

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(f"# python bench/export_gguf.py {' '.join(sys.argv[1:])}")
    print(f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit.stdout.strip()}")
    print(f"cpu: {describe_cpu()}; llama-cpp-python {llama_cpp.__version__}\n")
    run = load_run(args.run, device="cpu")
    print("| file | prompt | same tokens | max abs logit difference | greedy tokens equal to keel's |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, int8 in [("float32", False)] + ([("Q8_0", True)] if args.int8 else []):
            out = Path(tmp) / label
            export_run(args.run, out, fmt="gguf", int8=int8)
            for prompt, same_tokens, logit_diff, same, length in compare(Llama, out / GGUF_FILE, run, args.new_tokens):
                print(f"| {label} | {prompt!r} | {same_tokens} | {logit_diff:.2e} | {same} of {length} |")


if __name__ == "__main__":
    main()
