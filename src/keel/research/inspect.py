"""`keel inspect RUN_DIR`: what a language-model run is fed, and what happens inside it.

Four views of a run's newest good checkpoint, and a list of findings:

- **the batch** at a data cursor, exactly as the model sees it: the token ids of each row decoded
  through the run's tokenizer, cut where documents or packed examples begin, with the tokens that
  carry no loss (prompts, padding, a row's first token) inside ⟪ ⟫. The batch at cursor c is a
  pure function of (data, seed, c) — the task builds it as training did — so any step's batch can
  be looked at after the fact (cursor = the step's index in the batch stream, which runs ahead of
  the step count once the supervisor has skipped batches);
- **activations** on a text (`--prompt`, by default the start of the data's val split): per block,
  the RMS of the residual stream entering it and the RMS of what its attention and its MLP add,
  relative to it;
- **attention**: per layer and head, the entropy of the attention weights (mean over the queries,
  in nats, and as a share of the entropy of uniform attention over the positions each query sees),
  and one PNG per layer with a panel per head;
- **predictions** along the text: per position, the actual next token, its probability and rank,
  and the model's top k.

Activations and attention weights are taken from outside the model with forward hooks; the
attention weights are recomputed from the layer's own q/k projections, norms and rotary tables
(the model's kernel, fused or not, never materialises them), so the model file needs no hook
points. The recomputation is checked against the layer's real output in the tests.

Findings (each with its evidence):

- a head that puts COLLAPSED_SHARE of its attention on one fixed position (typically position 0)
  whatever the query: it passes the same value everywhere, a dead or sink head;
- a head whose attention is uniform (normalised entropy over UNIFORM_SHARE): it averages the
  whole prefix and selects nothing;
- a sub-layer (attention or MLP) whose update is under DEAD_UPDATE of the residual it is added to:
  the block does nothing;
- a token that is the model's top prediction at DOMINANT_SHARE of the positions or more while
  being the actual next token at under half as many: the model predicts it whatever comes.

Queries that see fewer than MIN_KEYS positions are left out of the head statistics: the first
query can only attend to itself, which says nothing about the head.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from keel.errors import UserError
from keel.tasks.lm import IGNORE_INDEX

COLLAPSED_SHARE = 0.9
UNIFORM_SHARE = 0.99
DEAD_UPDATE = 1e-3
DOMINANT_SHARE = 0.5
MIN_KEYS = 4
MIN_PREDICTIONS = 16  # positions needed before a dominant prediction means anything
DEFAULT_TEXT_TOKENS = 64  # the default text: this many tokens from the start of the val split
UNSCORED_OPEN, UNSCORED_CLOSE = "⟪", "⟫"


# -- loading -------------------------------------------------------------------------------------


def load_lm_run(run_dir: Path):
    """The run's newest good checkpoint (keel.inference.LoadedRun); a UserError for a diffusion run or missing data."""
    from keel.inference import load_run
    from keel.runs.rundir import load_run_config

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    if config.task.kind == "diffusion":
        raise UserError(
            f"{run_dir} is a diffusion run and keel inspect reads language models; look at its samples "
            f"(RUN_DIR/samples, keel sample) and score them with keel eval."
        )
    data = Path(config.data.path)
    if not (data / "manifest.json").is_file():
        raise UserError(
            f"the data of {run_dir} ({data}, data.path in its config.yaml) is missing, and keel inspect shows "
            "batches and text from it; restore it or prepare it again with keel prepare."
        )
    return load_run(run_dir)


# -- the batch at a cursor -----------------------------------------------------------------------


@dataclass
class Piece:
    """A stretch of a row: a document or a packed example (or padding), as token ids with loss flags."""

    label: str  # "document", "example", "sequence", "padding"
    start: int  # its first position in the row
    ids: list[int]
    scored: list[bool]  # the token carries loss (it is a target that is not ignored)


def last_cursor(run) -> int | None:
    """The last cursor `run` trains on: train.max_steps - 1 plus the batches it has skipped so far
    (read from its newest checkpoint); None for a run with no step limit (a time budget)."""
    if not run.config.train.max_steps:
        return None
    state = torch.load(run.checkpoint / "state.pt", map_location="cpu", weights_only=True)
    loop = state.get("loop", {})
    return run.config.train.max_steps - 1 + max(0, loop.get("cursor", 0) - loop.get("step", 0))


def training_batch(run, cursor: int) -> list[dict[str, torch.Tensor]]:
    """The micro-batches (dicts of CPU tensors) of the step at `cursor`, built by the run's task as training
    built them."""
    from keel.tasks import build_task

    if cursor < 0:
        raise UserError(f"--cursor must be 0 or more (the index of a step's batch), got {cursor}.")
    last = last_cursor(run)
    if last is not None and cursor > last:
        raise UserError(
            f"--cursor {cursor} is past the end of {run.path}, which trains on cursors 0 to {last} "
            f"(train.max_steps={run.config.train.max_steps}, plus batches skipped); pass a cursor in that range."
        )
    task = build_task(run.config, torch.device("cpu"), torch.float32)
    accumulation = run.config.train.grad_accum
    return [task.batch(cursor * accumulation + micro).tensors for micro in range(accumulation)]


def row_pieces(tensors: dict[str, torch.Tensor], row: int, eot_id: int, packed_documents: bool) -> list[Piece]:
    """The pieces of one row. `packed_documents`: the row is a window of a token stream whose documents each
    start with eot_id (pretraining); otherwise it holds examples (segments) or one sequence and padding."""
    inputs = tensors["inputs"][row].tolist()
    targets = tensors["targets"][row].tolist()
    T = len(inputs)
    if "segments" in tensors:  # packed SFT examples: -1 is padding
        segments = tensors["segments"][row].tolist()
    else:
        scored_at = [t for t in range(T) if targets[t] != IGNORE_INDEX]
        end = T if packed_documents or not scored_at else scored_at[-1] + 1  # right padding after the sequence
        segments = [0] * end + [-1] * (T - end)
    pieces = []
    start = 0
    while start < T:
        end = start
        while end < T and segments[end] == segments[start]:
            end += 1
        if segments[start] < 0:
            pieces.append(Piece("padding", start, inputs[start:end], [False] * (end - start)))
        else:
            # the span's inputs, then the token its last position predicts
            ids = inputs[start:end] + ([targets[end - 1]] if targets[end - 1] != IGNORE_INDEX else [])
            scored = [False] + [targets[t] != IGNORE_INDEX for t in range(start, end)][: len(ids) - 1]
            label = "example" if "segments" in tensors else ("document" if packed_documents else "sequence")
            pieces += (
                _split_documents(Piece(label, start, ids, scored), eot_id)
                if packed_documents
                else [Piece(label, start, ids, scored)]
            )
        start = end
    return pieces


def _split_documents(piece: Piece, eot_id: int) -> list[Piece]:
    """A window of a token stream cut before every end-of-text token (each starts a document)."""
    cuts = [0] + [i for i, token in enumerate(piece.ids) if token == eot_id and i > 0] + [len(piece.ids)]
    return [
        Piece(piece.label, piece.start + a, piece.ids[a:b], piece.scored[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a
    ]


def render_piece(tokenizer, piece: Piece) -> str:
    """The piece's text, runs of tokens without loss inside ⟪ ⟫ (special tokens shown by name)."""
    out = []
    i = 0
    while i < len(piece.ids):
        j = i
        while j < len(piece.ids) and piece.scored[j] == piece.scored[i]:
            j += 1
        text = tokenizer.decode(piece.ids[i:j], skip_special_tokens=False)
        out.append(text if piece.scored[i] else f"{UNSCORED_OPEN}{text}{UNSCORED_CLOSE}")
        i = j
    return "".join(out)


def format_batch(run, cursor: int, max_rows: int) -> str:
    """The batch at `cursor` as text (see the module docstring), its first `max_rows` rows."""
    micro_batches = training_batch(run, cursor)
    kind = run.config.task.kind
    packed_documents = kind in ("pretrain", "distill")
    eot_id = run.tokenizer.token_to_id("<|endoftext|>")
    rows = [(m, r) for m, tensors in enumerate(micro_batches) for r in range(len(tensors["inputs"]))]
    scored = sum(int((t["targets"] != IGNORE_INDEX).sum()) for t in micro_batches)
    positions = sum(t["targets"].numel() for t in micro_batches)
    attention = {
        "pretrain": "attention runs across document boundaries (no mask between them)",
        "distill": "attention runs across document boundaries (no mask between them)",
        "sft": "attention stays inside each example (block-diagonal mask), positions restart",
        "dpo": "rows are chosen responses, then rejected ones, of the same pairs",
    }[kind]
    width = micro_batches[0]["inputs"].shape[1]
    plural = "es" if len(micro_batches) > 1 else ""
    lines = [
        f"batch at cursor {cursor} ({kind}, seed {run.config.train.seed}): {len(micro_batches)} micro-batch{plural}, "
        f"{len(rows)} rows x {width} positions, {scored:,} of {positions:,} targets carry loss; {attention}.",
        f"{UNSCORED_OPEN}...{UNSCORED_CLOSE} marks tokens that carry no loss (read as context only).",
    ]
    for number, (micro, row) in enumerate(rows[:max_rows]):
        tensors = micro_batches[micro]
        pieces = row_pieces(tensors, row, eot_id, packed_documents)
        row_scored = int((tensors["targets"][row] != IGNORE_INDEX).sum())
        name = f"row {number}" + (f" (micro-batch {micro})" if len(micro_batches) > 1 else "")
        if kind == "dpo":
            half = len(tensors["inputs"]) // 2
            name += f", pair {row % half}, {'chosen' if row < half else 'rejected'}"
        counts = {}
        for piece in pieces:
            counts[piece.label] = counts.get(piece.label, 0) + (len(piece.ids) if piece.label == "padding" else 1)
        what = ", ".join(f"{n} {label}{'s' if n > 1 and label != 'padding' else ''}" for label, n in counts.items())
        what = what.replace("padding", "padding tokens") if "padding" in counts else what
        lines.append(f"\n== {name}: {what}; {row_scored} of {tensors['targets'].shape[1]} targets carry loss ==")
        for piece in pieces:
            end = piece.start + len(piece.ids) - 1
            if piece.label == "padding":
                pad = run.tokenizer.decode(piece.ids[:1], skip_special_tokens=False)
                lines.append(f"-- padding, positions {piece.start}-{end}: {len(piece.ids)} x {pad}, no loss --")
                continue
            lines.append(f"-- {piece.label} at position {piece.start}, {len(piece.ids)} tokens --")
            lines.append(render_piece(run.tokenizer, piece))
    if len(rows) > max_rows:
        lines.append(f"\n({len(rows) - max_rows} more rows; --rows {len(rows)} shows them all)")
    return "\n".join(lines)


# -- the text the model reads --------------------------------------------------------------------


def text_ids(run, prompt: str | None) -> list[int]:
    """Token ids of `prompt` after <|endoftext|> (where documents start in training), or by default the first
    DEFAULT_TEXT_TOKENS tokens of the run's val split (the first val sequence for SFT and DPO runs)."""
    eot_id = run.tokenizer.token_to_id("<|endoftext|>")
    T = run.config.model.context_length
    if prompt is not None:
        if not prompt.strip():
            raise UserError("--prompt is empty; pass some text, or leave --prompt out to read the data's val split.")
        ids = [eot_id] + run.tokenizer.encode(prompt).ids
        if len(ids) > T:
            raise UserError(
                f"--prompt is {len(ids)} tokens with the leading <|endoftext|>, more than the model's context of {T}; "
                "shorten it."
            )
        return ids
    data = Path(run.config.data.path)
    if run.config.task.kind in ("sft", "dpo"):
        from keel.data.examples import open_examples

        ids = open_examples(data).sequences("val").get(0)[0].astype(np.int64).tolist()
    else:
        from keel.data import open_data

        ids = np.asarray(open_data(data).tokens("val")[: DEFAULT_TEXT_TOKENS + 1], dtype=np.int64).tolist()
    return ids[: min(T, DEFAULT_TEXT_TOKENS)]


def token_text(tokenizer, token_id: int) -> str:
    """One token, quoted, so spaces and newlines show."""
    return repr(tokenizer.decode([token_id], skip_special_tokens=False))


# -- activations and attention -------------------------------------------------------------------


def attention_weights(attn, x: torch.Tensor, cos, sin, mask) -> torch.Tensor:
    """The attention weights (B, nh, T, T) of keel.models.gpt.Attention `attn` on its input x (B, T, C),
    recomputed from its projections, QK norms and rotary tables as its forward pass computes them."""
    from keel.models.gpt import apply_rotary

    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)  # (B, nh, T, hs)
    k = attn.k_proj(x).view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
    q, k = attn.q_norm(q.float()), attn.k_norm(k.float())
    if cos is not None:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)  # (B, nh, T, hs)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)  # (B, nh, T, T)
    if mask is not None:
        allowed = mask  # (B, 1, T, T)
    elif attn.causal:
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    else:
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device)
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)


@dataclass
class LayerStats:
    layer: int
    residual_rms: float  # of the stream entering the block
    attention_update: float  # RMS of the attention output / RMS of the stream it is added to
    mlp_update: float  # RMS of the MLP output / RMS of the stream it is added to
    output_rms: float
    head_entropy: list[float]  # per head: mean entropy of the attention weights over the queries, nats
    head_uniformity: list[float]  # per head: that entropy over the uniform attention's, mean over the queries
    head_focus: list[float]  # per head: the largest mean share of attention one fixed position gets
    head_focus_position: list[int]  # per head: that position


@dataclass
class Prediction:
    position: int  # of the predicted token in the text
    actual: int
    probability: float
    rank: int  # 1 = the model's top choice
    top: list[tuple[int, float]]  # the top k (id, probability)


@dataclass
class Inspection:
    ids: list[int]
    embedding_rms: float
    layers: list[LayerStats]
    predictions: list[Prediction]
    attention: list[np.ndarray] = field(repr=False)  # per layer (nh, T, T)


def rms(x: torch.Tensor) -> float:
    return float(x.float().pow(2).mean().sqrt())


def inspect_text(model, ids: list[int], top_k: int = 5) -> Inspection:
    """Run `model` (a keel GPT) on one sequence of ids with hooks and collect the statistics of the module
    docstring; the model is left as it was."""
    device = next(model.parameters()).device
    captured: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(model.blocks))}
    handles = []
    for i, block in enumerate(model.blocks):

        def block_in(module, args, i=i):
            captured[i]["input"] = args[0].detach()

        def attention_hook(module, args, output, i=i):
            x, cos, sin, _, mask = (list(args) + [None] * 5)[:5]
            captured[i]["attention_update"] = output.detach()
            captured[i]["weights"] = attention_weights(module, x, cos, sin, mask).detach()

        def mlp_hook(module, args, output, i=i):
            captured[i]["mlp_update"] = output.detach()

        def block_out(module, args, output, i=i):
            captured[i]["output"] = output.detach()

        handles += [
            block.register_forward_pre_hook(block_in),
            block.attn.register_forward_hook(attention_hook),
            block.mlp.register_forward_hook(mlp_hook),
            block.register_forward_hook(block_out),
        ]
    embedding = {}
    handles.append(model.embed.register_forward_hook(lambda m, a, out: embedding.setdefault("out", out.detach())))
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=device)).float()[0]  # (T, V)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    layers, attention = [], []
    for i in range(len(model.blocks)):
        c = captured[i]
        stream = c["input"]
        mid = stream + c["attention_update"]  # what the MLP's update is added to
        weights = c["weights"][0].float().cpu()  # (nh, T, T)
        entropy, uniformity, focus, focus_position = head_statistics(weights)
        layers.append(
            LayerStats(
                i,
                rms(stream),
                rms(c["attention_update"]) / max(rms(stream), 1e-12),
                rms(c["mlp_update"]) / max(rms(mid), 1e-12),
                rms(c["output"]),
                entropy,
                uniformity,
                focus,
                focus_position,
            )
        )
        attention.append(weights.numpy())
    return Inspection(ids, rms(embedding["out"]), layers, predictions(logits, ids, top_k), attention)


def head_statistics(weights: torch.Tensor) -> tuple[list[float], list[float], list[float], list[int]]:
    """Per head of causal weights (nh, T, T), over the queries that see at least MIN_KEYS positions: mean entropy
    (nats), mean entropy relative to uniform attention over what each query sees, and the fixed key position
    with the largest mean share of the attention (that share, that position)."""
    n_head, T, _ = weights.shape
    # Counted from the causal structure, not from weights > 0: a sharp head's weights underflow to 0.
    visible = torch.arange(1, T + 1, dtype=torch.float32)  # (T,) keys each query sees
    queries = visible >= min(MIN_KEYS, T)
    w = weights[:, queries]  # (nh, Q, T)
    entropy = -(w * w.clamp_min(1e-30).log()).sum(-1)  # (nh, Q)
    uniform = visible[queries].log().clamp_min(1e-12)  # (Q,)
    share = w.mean(1)  # (nh, T): mean attention each key position gets from these queries
    focus, position = share.max(-1)
    return (
        entropy.mean(1).tolist(),
        (entropy / uniform).mean(1).tolist(),
        focus.tolist(),
        position.tolist(),
    )


def predictions(logits: torch.Tensor, ids: list[int], top_k: int) -> list[Prediction]:
    """Per position t >= 1: the actual token ids[t] under the prediction made at t - 1."""
    probs = logits[:-1].softmax(-1)  # (T-1, V)
    actual = torch.tensor(ids[1:], device=probs.device)
    p_actual = probs.gather(1, actual[:, None])[:, 0]
    ranks = (probs > p_actual[:, None]).sum(-1) + 1
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [
        Prediction(
            t + 1,
            ids[t + 1],
            float(p_actual[t]),
            int(ranks[t]),
            list(zip(top.indices[t].tolist(), top.values[t].tolist())),
        )
        for t in range(len(ids) - 1)
    ]


# -- findings ------------------------------------------------------------------------------------


@dataclass
class Finding:
    kind: str  # collapsed_head | uniform_head | dead_update | dominant_prediction
    where: str  # "layer 1 head 2", "layer 0 mlp", "predictions"
    evidence: str


def diagnose(inspection: Inspection, tokenizer) -> list[Finding]:
    """The pathologies of the module docstring found in `inspection`, each with its evidence."""
    findings = []
    for layer in inspection.layers:
        for head, (share, position) in enumerate(zip(layer.head_focus, layer.head_focus_position)):
            if share >= COLLAPSED_SHARE:
                token = token_text(tokenizer, inspection.ids[position])
                findings.append(
                    Finding(
                        "collapsed_head",
                        f"layer {layer.layer} head {head}",
                        f"puts {share:.0%} of its attention on position {position} ({token}) whatever the query "
                        f"(entropy {layer.head_entropy[head]:.2f} nats): it passes the same value everywhere",
                    )
                )
            elif layer.head_uniformity[head] >= UNIFORM_SHARE:
                findings.append(
                    Finding(
                        "uniform_head",
                        f"layer {layer.layer} head {head}",
                        f"attends uniformly: its entropy is {layer.head_uniformity[head]:.1%} of uniform attention's "
                        f"({layer.head_entropy[head]:.2f} nats), so it averages the prefix and selects nothing",
                    )
                )
        for part, ratio in (("attention", layer.attention_update), ("mlp", layer.mlp_update)):
            if ratio < DEAD_UPDATE:
                findings.append(
                    Finding(
                        "dead_update",
                        f"layer {layer.layer} {part}",
                        f"adds {ratio:.2e} of the residual stream's RMS ({layer.residual_rms:.3g}): "
                        f"the sub-layer does nothing",
                    )
                )
    preds = inspection.predictions
    if len(preds) >= MIN_PREDICTIONS:
        tops = [p.top[0][0] for p in preds]
        token, count = max(((t, tops.count(t)) for t in set(tops)), key=lambda pair: pair[1])
        share = count / len(preds)
        actual_share = sum(p.actual == token for p in preds) / len(preds)
        if share >= DOMINANT_SHARE and actual_share < share / 2:
            findings.append(
                Finding(
                    "dominant_prediction",
                    "predictions",
                    f"{token_text(tokenizer, token)} is the top prediction at {count} of {len(preds)} positions "
                    f"({share:.0%}) but the actual next token at {actual_share:.0%}: the model predicts it whatever "
                    "comes",
                )
            )
    return findings


# -- output --------------------------------------------------------------------------------------


def format_inspection(inspection: Inspection, tokenizer, findings: list[Finding]) -> str:
    lines = [
        f"text: {len(inspection.ids)} tokens, {token_text(tokenizer, inspection.ids[0])} first",
        "",
        "activations (RMS of the residual stream entering each block; each sub-layer's update as a share of the "
        "stream it is added to)",
        f"{'layer':>5}  {'stream RMS':>10}  {'attention':>9}  {'mlp':>9}  {'out RMS':>9}",
        f"{'embed':>5}  {inspection.embedding_rms:>10.4g}",
    ]
    for s in inspection.layers:
        lines.append(
            f"{s.layer:>5}  {s.residual_rms:>10.4g}  {s.attention_update:>9.4f}  {s.mlp_update:>9.4f}  "
            f"{s.output_rms:>9.4g}"
        )
    lines += [
        "",
        f"attention entropy per head, nats (share of uniform attention's; queries seeing >= {MIN_KEYS} positions)",
    ]
    for s in inspection.layers:
        heads = "  ".join(f"{e:.2f} ({u:.0%})" for e, u in zip(s.head_entropy, s.head_uniformity))
        lines.append(f"  layer {s.layer}: {heads}")
    k = len(inspection.predictions[0].top) if inspection.predictions else 0
    lines += ["", f"predictions (probability and rank of the actual next token; the model's top {k})"]
    lines.append(f"{'pos':>4}  {'actual':<16} {'p':>6} {'rank':>5}  top {k}")
    for p in inspection.predictions:
        top = "  ".join(f"{token_text(tokenizer, t)} {q:.3f}" for t, q in p.top)
        lines.append(
            f"{p.position:>4}  {token_text(tokenizer, p.actual)[:16]:<16} {p.probability:>6.3f} {p.rank:>5}  {top}"
        )
    correct = sum(p.rank == 1 for p in inspection.predictions)
    if inspection.predictions:
        mean_loss = -sum(math.log(max(p.probability, 1e-30)) for p in inspection.predictions) / len(
            inspection.predictions
        )
        lines.append(
            f"top-1 right at {correct} of {len(inspection.predictions)} positions; mean loss {mean_loss:.3f} nats"
        )
    lines += ["", "findings:" if findings else "findings: none"]
    lines += [f"  {f.kind} at {f.where}: {f.evidence}" for f in findings]
    return "\n".join(lines)


def write_attention_maps(inspection: Inspection, tokenizer, out_dir: Path) -> list[Path]:
    """One PNG per layer, attention_layerNN.png, a panel per head (query rows, key columns), into out_dir;
    each file is written under a temporary name and renamed, so none is ever half-written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [tokenizer.decode([i], skip_special_tokens=False) for i in inspection.ids]
    show_labels = len(labels) <= 48
    paths = []
    for layer, weights in zip(inspection.layers, inspection.attention):
        n_head = weights.shape[0]
        columns = min(4, n_head)
        rows = -(-n_head // columns)
        # Shared axes: tick labels only on the outer panels (drawing them is most of the cost of a map).
        figure, axes = plt.subplots(
            rows, columns, figsize=(2.6 * columns + 0.8, 2.6 * rows + 0.9), squeeze=False, sharex=True, sharey=True
        )
        for head in range(rows * columns):
            ax = axes[head // columns][head % columns]
            if head >= n_head:
                ax.axis("off")
                continue
            ax.imshow(weights[head], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"head {head}: {layer.head_entropy[head]:.2f} nats", fontsize=8)
        if show_labels:
            ticks = range(len(labels))
            shown = [repr(t)[1:-1] for t in labels]
            axes[0][0].set_yticks(ticks, shown, fontsize=5)
            for ax in axes[-1]:
                ax.set_xticks(ticks, shown, rotation=90, fontsize=5)
        else:
            axes[0][0].set_ylabel("query position", fontsize=8)
            for ax in axes[-1]:
                ax.set_xlabel("key position", fontsize=8)
        figure.suptitle(f"layer {layer.layer} attention (rows: queries, columns: keys)", fontsize=10)
        figure.subplots_adjust(left=0.1, right=0.98, bottom=0.2 if show_labels else 0.12, top=0.82, wspace=0.08)
        path = out_dir / f"attention_layer{layer.layer:02d}.png"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        figure.savefig(tmp, format="png", dpi=110)
        plt.close(figure)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def write_json(inspection: Inspection, findings: list[Finding], out_dir: Path) -> Path:
    """inspect.json: the statistics, predictions and findings, for programs."""
    record = {
        "ids": inspection.ids,
        "embedding_rms": inspection.embedding_rms,
        "layers": [asdict(layer) for layer in inspection.layers],
        "predictions": [asdict(p) for p in inspection.predictions],
        "findings": [asdict(f) for f in findings],
    }
    path = out_dir / "inspect.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def inspect_run(
    run_dir: Path,
    cursor: int = 0,
    prompt: str | None = None,
    out_dir: Path | None = None,
    rows: int = 4,
    top_k: int = 5,
) -> tuple[str, list[Finding], list[Path]]:
    """Everything `keel inspect` prints (the batch, then the inspection of the text), the findings, and
    the files written into out_dir (default RUN_DIR/inspect): the attention maps and inspect.json.

    Every input is checked before anything is written."""
    if rows < 1 or top_k < 1:
        raise UserError(f"--{'rows' if rows < 1 else 'top-k'} must be a positive integer.")
    run = load_lm_run(Path(run_dir))
    out_dir = Path(out_dir) if out_dir is not None else run.path / "inspect"
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; pass a directory for the attention maps.")
    batch_text = format_batch(run, cursor, rows)
    ids = text_ids(run, prompt)
    if len(ids) < 2:
        raise UserError("the text is a single token, with nothing to predict; pass a longer --prompt.")
    inspection = inspect_text(run.model, ids, top_k)
    findings = diagnose(inspection, run.tokenizer)
    paths = write_attention_maps(inspection, run.tokenizer, out_dir)
    paths.append(write_json(inspection, findings, out_dir))
    header = f"{run.path}: {run.config.task.kind} run, step {run.step} ({run.checkpoint.name})"
    text = "\n\n".join([header, batch_text, format_inspection(inspection, run.tokenizer, findings)])
    return text, findings, paths
