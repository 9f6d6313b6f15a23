"""The run config: typed sections, loaded from YAML plus dotted `--set` overrides, validated.

Every field carries a one-line help string; `keel config` and docs/config.md are made
from them. Unknown keys are an error that suggests the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from keel.errors import UserError


def opt(default: Any, help: str, key: str = "") -> Any:
    """A config field with its help text; `key` names it in files when its name is a Python keyword."""
    return field(default=default, metadata={"help": help, "key": key})


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


@dataclass
class DataConfig:
    """Where the training tokens come from."""

    path: str = opt(
        "data/python-stdlib",
        "DATA_DIR written by `keel prepare` (tokenizer.json, shards, manifest.json; images for task.kind=diffusion).",
    )


@dataclass
class TaskConfig:
    """What the run trains for: the task supplies the batches, the loss and the evaluation."""

    kind: str = opt(
        "pretrain",
        "pretrain (next-token prediction on text) | sft (supervised fine-tuning on examples) | "
        "dpo (preference pairs; needs init.from) | distill (learn from a teacher run; needs distill.teacher) | "
        "diffusion (a DiT generating images of the data's classes; model.* sizes its trunk).",
    )


@dataclass
class InitConfig:
    """Where the weights of step 0 come from."""

    from_: str = opt(
        "",
        "RUN_DIR whose best checkpoint (lowest val loss) and tokenizer start this run; "
        "empty starts from random weights. The model shape is taken from that run.",
        key="from",
    )


@dataclass
class SFTConfig:
    """Supervised fine-tuning (task.kind=sft)."""

    loss_on: str = opt(
        "completion",
        "completion (completion tokens / assistant turns and their end token) | all (every token of each example).",
    )


@dataclass
class LoRAConfig:
    """Low-rank adapters on the init.from model, its weights frozen (any task)."""

    rank: int = opt(0, "Rank of the adapters; 0 trains every weight (no LoRA), > 0 trains only the adapters.")
    alpha: float = opt(16.0, "The adapters' update is scaled by alpha / rank.")
    dropout: float = opt(0.0, "Dropout on the adapters' input during training.")
    targets: str = opt(
        "all",
        "Comma-separated linear layers that get adapters: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
        "down_proj (every block), a dotted path such as blocks.0.attn.q_proj, or all.",
    )


@dataclass
class DPOConfig:
    """Preference optimisation (task.kind=dpo); the reference model is the init.from run."""

    loss: str = opt(
        "sigmoid",
        "sigmoid (DPO) | ipo | hinge; each takes the soft target p_chosen of every pair (1 when the pair has none).",
    )
    beta: float = opt(
        0.1, "Strength of the pull towards the reference: the implied reward is beta * log(policy / reference)."
    )
    soft_labels: bool = opt(
        True, "Use each pair's p_chosen / votes as its target; false treats every pair as p_chosen = 1 (hard labels)."
    )
    displacement_patience: int = opt(
        50,
        "Steps the chosen log-prob must keep falling while the margin grows before the likelihood-displacement signal.",
    )


@dataclass
class DistillConfig:
    """Knowledge distillation (task.kind=distill): the student is this run's model, the teacher another run."""

    teacher: str = opt(
        "",
        "RUN_DIR of the teacher, whose best checkpoint is distilled; it must share the data's tokenizer. "
        "Its top-k log-probs are cached once in RUN_DIR/cache and reused by later students.",
    )
    loss: str = opt(
        "forward",
        "forward (KL(teacher || student), as torchtune) | reverse (KL(student || teacher)) | "
        "jsd (generalised Jensen-Shannon with distill.jsd_beta, as TRL's GKD).",
    )
    temperature: float = opt(1.0, "Temperature T of both distributions; the divergence is scaled by T^2.")
    ratio: float = opt(
        0.5, "Share r of the divergence in the loss: (1 - r) * cross-entropy on the data + r * T^2 * divergence."
    )
    jsd_beta: float = opt(0.5, "Weight of the teacher in the mixture of distill.loss=jsd, within (0, 1).")
    top_k: int = opt(
        32,
        "Teacher log-probs kept per position: the top k, plus the rest of the mass as one bucket (k = vocab: exact).",
    )
    max_windows: int = opt(
        0,
        "Training windows the teacher caches and the student cycles through; 0: the whole train split, or one epoch "
        "of the run (train.max_steps x batch_size x grad_accum windows) if that is fewer.",
    )


@dataclass
class DiffusionConfig:
    """Image generation (task.kind=diffusion): a DiT whose trunk is model.n_layer, d_model, n_head, mlp_hidden."""

    objective: str = opt(
        "flow",
        "flow (rectified flow: x_t = (1 - t) x + t noise, velocity target, logit-normal t) | "
        "ddpm (noise prediction on a cosine schedule of 1000 steps).",
    )
    patch_size: int = opt(4, "Side of the square patches the image is cut into (one token each); must divide it.")
    class_dropout: float = opt(
        0.1, "Share of training images whose class is replaced by the null class, for classifier-free guidance."
    )
    ema_decay: float = opt(
        0.999, "Decay of the exponential moving average of the weights that evaluation and sampling use."
    )
    sampler: str = opt(
        "auto", "euler | heun (flow) | ddpm (ancestral) | ddim (ddpm); auto: heun for flow, ddim for ddpm."
    )
    sample_steps: int = opt(16, "Sampler steps per image (a Heun step costs two model calls, guidance doubles each).")
    guidance: float = opt(
        1.0, "Classifier-free guidance scale of the samples; 1 is the plain conditional model (no guidance)."
    )
    # A grid is not free: every image goes through the model at every sampler step (twice with guidance),
    # which adds up to dozens of training steps' worth of compute per evaluation; the default grid is small.
    grid_columns: int = opt(
        4, "Images per class row of the sample grid each evaluation writes to RUN_DIR/samples/; 0 writes none."
    )


MLPS = ("swiglu", "relu2")


@dataclass
class ModelConfig:
    """Shape of the decoder-only transformer."""

    # 4 x 192 (3.3M parameters with 8192 tokens): sized for minutes on a CPU, where a smaller model that
    # sees more tokens beats a larger one (docs/benchmarks.md, "Quality in a fixed time").
    n_layer: int = opt(4, "Number of transformer blocks.")
    n_head: int = opt(3, "Number of query heads; must divide d_model.")
    n_kv_head: int = opt(0, "Number of key/value heads (grouped-query attention); must divide n_head; 0 means n_head.")
    d_model: int = opt(192, "Width of the residual stream.")
    context_length: int = opt(256, "Tokens per training sequence and the longest context at sampling.")
    vocab_size: int = opt(0, "Vocabulary size; 0 takes it from the data's tokenizer.")
    mlp: str = opt(
        "swiglu",
        "MLP of each block: swiglu (down(silu(gate x) * up x), Llama's) | relu2 (down(relu(up x)^2), "
        "modded-nanogpt's: 3.7% fewer bits per byte in 10 CPU minutes; exports to Hugging Face, not to GGUF).",
    )
    mlp_hidden: int = opt(
        0,
        "Hidden width of the MLP; 0 picks 8/3 d_model (swiglu) or 4 d_model (relu2) rounded up to a multiple "
        "of 64, the same parameters either way.",
    )
    qk_norm: bool = opt(False, "RMSNorm on queries and keys before attention (stabilises large learning rates).")
    attention: str = opt(
        "auto",
        "Attention kernel: sdpa (PyTorch's fused scaled_dot_product_attention) | "
        "matmul (scores as a plain T x T matrix) | "
        "auto (matmul on a CPU up to context 512, where it is faster, else sdpa).",
    )
    tie_embeddings: bool = opt(True, "Share the input embedding and output projection weights.")
    rope_theta: float = opt(10000.0, "Base of the rotary position embedding frequencies.")
    norm_eps: float = opt(1e-5, "Epsilon of RMSNorm.")


@dataclass
class OptimConfig:
    """The optimizer and the learning-rate schedule."""

    optimizer: str = opt(
        "auto",
        "auto | adamw | muon: Muon (orthogonalised momentum) for the hidden weight matrices, "
        "AdamW for embeddings, lm_head and norms. auto: muon when pretraining from scratch with whole "
        "matrices (no init.from, no LoRA, no FSDP), adamw otherwise.",
    )
    lr: float = opt(2e-3, "Peak learning rate.")
    min_lr_ratio: float = opt(0.1, "Final learning rate as a fraction of the peak.")
    schedule: str = opt("wsd", "Learning-rate schedule after warmup: cosine | wsd (warmup-stable-decay) | constant.")
    decay_fraction: float = opt(0.3, "Fraction of the run spent decaying at the end of the wsd schedule.")
    warmup_steps: int = opt(50, "Steps of linear warmup from 0 to the peak learning rate.")
    weight_decay: float = opt(0.1, "Decoupled weight decay on matrices; norms, biases and embeddings get none.")
    beta1: float = opt(0.9, "AdamW beta1.")
    beta2: float = opt(
        0.99, "AdamW beta2 (0.99 as nanoGPT's small models: 5% lower bits per byte in 10 minutes than 0.95)."
    )
    eps: float = opt(1e-8, "AdamW epsilon.")
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this value; 0 turns clipping off.")


@dataclass
class TrainConfig:
    """The loop: batch, stopping, evaluation, checkpoints, hardware."""

    batch_size: int = opt(8, "Sequences per micro-batch.")
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.")
    max_steps: int = opt(
        1000,
        "Stop after this many optimizer steps; 0 means no step limit (train.max_minutes then ends the run). "
        "The lr schedule spans the run: max_steps, or the steps max_minutes buys at the rate measured so far, "
        "whichever is fewer.",
    )
    max_tokens: int = opt(0, "Stop after this many training tokens; 0 means no limit.")
    max_minutes: float = opt(
        0.0,
        "Stop after this many minutes of training, counted across restarts, "
        "with the lr schedule planned to end then; 0 means no limit.",
    )
    eval_every: int = opt(200, "Evaluate on the validation split every this many steps (and at the end).")
    eval_batches: int = opt(20, "Validation batches per evaluation.")
    checkpoint_every: int = opt(200, "Write a checkpoint every this many steps (and at the end).")
    keep_checkpoints: int = opt(3, "Keep this many latest checkpoints, plus the one with the best val loss.")
    log_every: int = opt(10, "Write metrics to the registry and update the progress bar every this many steps.")
    tensorboard: bool = opt(
        False, "Also write the metrics and the logbook as TensorBoard event files into RUN_DIR/tensorboard (rank 0)."
    )
    seed: int = opt(1337, "Seed for initialisation and for the data order.")
    device: str = opt("auto", "auto | cpu | cuda (auto takes cuda when available).")
    dtype: str = opt(
        "auto",
        "auto | float32 | bfloat16 | float16 (auto: bf16 where the hardware has it, else fp16 on CUDA, else fp32).",
    )
    compile: bool | str = opt(
        "auto",
        "true | false | auto: torch.compile the model (auto: when the run has at least 500 steps and, "
        "under train.max_minutes, 4 minutes to go, enough to repay the compilation).",
    )
    deterministic: bool = opt(
        True,
        "Use deterministic kernels, so a resumed or repeated run matches the uninterrupted one bit for bit on "
        "the same machine, compiled or not (false: a little faster on a GPU, equal only to rounding).",
    )
    activation_checkpointing: bool = opt(
        False,
        "Recompute each block's activations in the backward pass: far less memory for about a third more compute.",
    )
    parallel: str = opt(
        "ddp",
        "ddp | fsdp: how several processes (keel train --nproc N, or torchrun) share a step: ddp replicates "
        "the model, fsdp (FSDP2) shards weights, gradients and optimizer state across them.",
    )


@dataclass
class SupervisorConfig:
    """The training supervisor: monitors, the repair ladder and its budget."""

    enabled: bool = opt(
        True,
        "Watch training and repair instabilities; false gives a bare loop that applies every update, NaN included.",
    )

    # Spikes. OLMo-core's SkipStepOptimizer skips a step whose loss or grad norm is more than 6σ
    # from the mean of the previous 128 steps, once max(20, 128 // 2) = 64 values are in: batch
    # noise has heavier tails than a Gaussian, and a good batch skipped is still a batch lost.
    # The ratio tests fire from the 10th step on and ignore an inflated σ. Measured on healthy
    # runs of two small models: the worst batch loss was 1.28x its 20-step EWM and the worst grad
    # norm 5.6x, while 10x-lr runs showed grad norms 20-35x theirs.
    spike_window: int = opt(128, "Steps in the rolling window of the spike test (OLMo-core's default).")
    spike_sigma: float = opt(
        6.0, "A loss or grad norm above mean + this many σ of the window is a spike (OLMo-core's default)."
    )
    spike_warmup: int = opt(64, "Values the window needs before the σ test runs (OLMo-core: max(20, window/2)).")
    loss_spike_ratio: float = opt(
        2.0, "A loss above this multiple of its moving average is a spike, even before the σ test is warm."
    )
    grad_spike_ratio: float = opt(
        10.0, "A grad norm above this multiple of its moving average is a spike (Megatron-LM's 10x)."
    )
    spike_ewm_span: int = opt(20, "Span in steps of the moving average behind the ratio tests.")

    # Divergence: the slow climb no single step makes look like a spike. A 50-step EWM of the loss
    # moves ~0.7% with batch noise of 5%, and its best is biased low by a few of those; 10% above
    # it for 50 steps running is a trend, not noise. The same EWM judges repairs. Late in a run that
    # has seen its corpus several times the batch losses swing further than that while the held-out
    # loss falls (docs/benchmarks.md, 30 minutes), so with held-out data the trend must show there too.
    divergence_margin: float = opt(
        0.1,
        "The loss diverges when its moving average stays this fraction above its best "
        "(and, with held-out data, the held-out loss rose by half of it).",
    )
    divergence_span: int = opt(
        50, "Span in steps of the loss moving average used for divergence and for judging repairs."
    )
    divergence_patience: int = opt(
        50, "Steps the loss average must stay above best·(1 + margin) to count as divergence."
    )

    # Norm growth. The last-block activation RMS grows by orders of magnitude in healthy runs too,
    # further the higher the (still good) learning rate, so a bound on growth since initialisation
    # either misses blow-ups or stops good runs. Growth that buys no loss is the trouble: a healthy
    # run's loss falls while its norm grows, a too-high learning rate's stalls or climbs (measured
    # in docs/benchmarks.md, "The repair ladder at 10x and 20x the learning rate"). Later in
    # a run, the average doubling within a few hundred steps is what OPT-175B's logbook shows before
    # divergences.
    norm_stall_growth: float = opt(
        100.0, "Activation or logit RMS growing this many times over while the loss stalls is a signal."
    )
    norm_min_progress: float = opt(
        0.02, "The loss average must fall this fraction over that growth, or the growth is a signal."
    )
    norm_growth_ratio: float = opt(
        2.0, "Activation or logit RMS above this multiple of its long-run average is a signal."
    )
    norm_fast_span: int = opt(10, "Span in steps of the recent activation/logit RMS average.")
    norm_slow_span: int = opt(500, "Span in steps of the long-run activation/logit RMS average.")
    norm_warmup: int = opt(
        500, "Steps before growth against the long-run average is judged (early training moves norms fast)."
    )

    # fp16 loss scale. PyTorch's GradScaler starts at 2^16 and halves on each overflowing step; a
    # scale under 1 means the unscaled gradients alone overflow fp16's 65504. fairseq gives up at
    # 1e-4, far later than needed.
    loss_scale_floor: float = opt(1.0, "An fp16 loss scale under this is a collapse.")
    loss_scale_halvings: int = opt(
        10, "This many loss-scale halvings in a row (overflowing steps, each skipped) is a collapse."
    )

    # Throughput. Single slow steps (checkpoint writes, garbage collection) measured up to 2.4x the
    # usual; a sustained 3x is a sick machine or a straggler. No repair inside the run fixes that.
    slow_step_factor: float = opt(3.0, "A step taking this multiple of the median step time is slow.")
    slow_step_patience: int = opt(20, "Slow steps in a row before the throughput collapse is logged.")

    # The rate check. A too-high AdamW rate can hurt without any per-step sign of trouble (its
    # loss falls, slower; measured in docs/benchmarks.md): only an experiment shows it. Once, when
    # warmup ends plus rate_check_steps, the run so far is trained again from step 0 on the same
    # batches at half the rate and the two compared on the validation set; the lower rate is kept
    # when it wins by rate_check_margin, and halved again while halving wins.
    rate_check_steps: int = opt(
        30,
        "Steps after warmup at which the rate check compares the run with its half-rate replay (0: no check); "
        "runs planned shorter than 4x (warmup + this) skip it.",
    )
    rate_check_margin: float = opt(
        0.005, "The half rate is kept when its validation loss is lower by at least this fraction."
    )

    # The ladder and its budget. PaLM restarted ~100 steps before a spike and skipped 200-500
    # batches of a 255k-step run (0.1-0.2%); small runs still skip at least a handful.
    skip_spikes: bool = opt(True, "Rung 1: drop the update of a spiking step (non-finite updates are always dropped).")
    repair_after_skips: int = opt(
        3, "Loss spikes or non-finite steps within one incident before a repair (rung 2+) is tried."
    )
    rollback: bool = opt(
        True, "Rung 2 (and part of 3 and 4): roll back to the last good checkpoint before the trouble and skip batches."
    )
    skip_fraction: float = opt(
        0.002, "Batches skipped after a rollback, as a fraction of the run's planned steps (PaLM: 200-500 of 255k)."
    )
    skip_min: int = opt(10, "At least this many batches are skipped after a rollback.")
    skip_max: int = opt(500, "At most this many batches are skipped after a rollback (PaLM's largest skip).")
    lower_lr: bool = opt(True, "Rung 3: lower the learning rate and tighten clipping for the rest of the run.")
    lr_factor: float = opt(0.5, "Rung 3 multiplies the learning rate by this (1 leaves it).")
    clip_factor: float = opt(
        0.5,
        "Rung 3 multiplies the clip value by this (1 leaves it); "
        "with clipping off it clips at this × the typical grad norm.",
    )
    reset_optimizer: bool = opt(True, "Rung 4: zero AdamW moments so stale statistics do not drive the repaired run.")
    reset_moments: str = opt(
        "exp_avg,exp_avg_sq", "AdamW moments rung 4 zeroes, comma-separated (exp_avg, exp_avg_sq)."
    )
    stop_on_failure: bool = opt(
        True,
        "Rung 5: stop the run with a diagnosis when repairs fail or the budget is spent (false: carry on unrepaired).",
    )
    max_repairs: int = opt(8, "Budget: repairs (rungs 2-4) allowed in the whole run.")
    judge_steps: int = opt(
        100, "Steps past the trouble after which a skip or a repair is judged (PaLM restarted ~100 steps back)."
    )
    recovery_tolerance: float = opt(
        0.05, "A repair worked when the loss average is back under best·(1 + this), half the divergence margin."
    )


@dataclass
class WatchdogConfig:
    """When to restart the trainer process and when to give up."""

    max_restarts: int = opt(10, "Restart the trainer at most this many times in one `keel train`.")
    max_restarts_without_progress: int = opt(3, "Give up when this many restarts in a row wrote no new checkpoint.")
    # 300 s: long enough for the slow moments that may pause a heartbeat written from the loop
    # (an evaluation, a recompilation, a large checkpoint on network storage),
    # yet half of the 10-minute default timeout torch.distributed gives NCCL collectives, so a
    # stuck collective is caught here first, and minutes instead of the hours a person needs.
    hang_timeout_s: float = opt(300.0, "Kill and restart the trainer when its heartbeat is this many seconds old.")
    # Start-up has pauses of its own that grow with the model and the machine, not with trouble.
    startup_timeout_s: float = opt(
        600.0,
        "Allow a trainer this long without a heartbeat until its first step is done (imports, data, compiling).",
    )
    # A transient fault (a busy file system, a GPU reset) tends to clear in seconds; doubling
    # up to a minute keeps a persistent one from being hammered.
    backoff_s: float = opt(2.0, "Wait this long before the first restart; doubles with each failure in a row.")
    backoff_max_s: float = opt(60.0, "Never wait longer than this before a restart.")


@dataclass
class RunConfig:
    """A whole run."""

    name: str = opt("", "Run name; empty takes the run directory's name.")
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    init: InitConfig = field(default_factory=InitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    def to_flat_dict(self) -> dict[str, Any]:
        """Every key dotted (`optim.lr`), as --set and the config reference name them."""
        return _flatten(self.to_dict())


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _to_dict(section: Any) -> dict[str, Any]:
    """Like dataclasses.asdict, with every field under its key (`init.from`, not `init.from_`)."""
    return {
        _key(f): (_to_dict(v) if dataclasses.is_dataclass(v := getattr(section, f.name)) else v)
        for f in dataclasses.fields(section)
    }


# ---------------------------------------------------------------------------------------------
# loading


TASK_KINDS = ("pretrain", "sft", "dpo", "distill", "diffusion")
OBJECTIVES = {"flow": ("euler", "heun"), "ddpm": ("ddpm", "ddim")}  # diffusion.objective -> its samplers


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    """Type of each field, by its key."""
    hints = typing.get_type_hints(cls)
    return {_key(f): hints[f.name] for f in dataclasses.fields(cls)}


def _field_names(cls: type) -> dict[str, str]:
    return {_key(f): f.name for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check a YAML value against the field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key)
            except UserError:
                continue
        raise UserError(f"config key {key} got {value!r}, which is not a {tp}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            # No setting means "unbounded" by inf (0 does where it can): nan or inf is always a slip.
            if not math.isfinite(number):
                raise UserError(f"config key {key} must be a finite number, got {value!r}.")
            return number
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise UserError(f"config key {key} must be a {tp.__name__}, got {value!r}; fix the value in the config or --set.")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _field_types(cls).items():
        if _is_section(tp):
            keys += _all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def nearest_key(key: str) -> str | None:
    """The valid config key closest to key (None when none is close), for messages that refuse a key."""
    if key in _all_keys(RunConfig):
        return key
    close = difflib.get_close_matches(key, _all_keys(RunConfig), n=1, cutoff=0.5)
    return close[0] if close else None


def _unknown_key(key: str) -> UserError:
    close = nearest_key(key)
    hint = f" Did you mean {close}?" if close else " Run `keel config` to list the valid keys."
    return UserError(f"unknown config key {key}.{hint}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"config section {prefix.rstrip('.') or '(top level)'} must be a mapping, got {raw!r}.")
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        if name not in types_:
            while isinstance(value, dict) and value:  # name the full dotted key: modle.n_layer
                name, value = next(iter(value.items()))
                key = f"{key}.{name}"
            raise _unknown_key(key)
        tp = types_[name]
        value = _build(tp, value or {}, key + ".") if _is_section(tp) else _coerce(value, tp, key)
        kwargs[_field_names(cls)[name]] = value
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise _unknown_key(key)
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["optim.lr=1e-3", "train.compile=true"]` -> nested dict with YAML-parsed values."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r} is not KEY=VALUE; write it like --set optim.lr=1e-3.")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(raw: dict[str, Any]) -> RunConfig:
    config = _build(RunConfig, raw, "")
    if config.model.n_kv_head == 0:
        config.model.n_kv_head = config.model.n_head
    validate(config)
    return config


def load(path: str | Path | None, overrides: list[str] | None = None, saved: bool = False) -> RunConfig:
    """Read a YAML config file (or start from defaults when path is None), apply overrides, validate.

    saved=True reads a config keel wrote into a run directory, perhaps by an older keel: keys this
    keel no longer has are dropped with a note on stderr (a user's own file with them is refused).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist; pass the path of a YAML file to --config.")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"config file {path} is not valid YAML{where}; fix its syntax.") from None
        if not isinstance(raw, dict):
            raise UserError(
                f"config file {path} holds a {type(raw).__name__}, not a mapping of sections; "
                "write it as `section:` lines with `key: value` under each, as `keel config` lists them."
            )
    if saved:
        dropped = _drop_unknown(RunConfig, raw, "")
        if dropped:
            gone = ", ".join(dropped)
            print(f"note: {path} has settings this keel no longer has ({gone}); ignored.", file=sys.stderr)
    return from_dict(_merge(raw, parse_overrides(overrides or [])))


def _drop_unknown(cls: type, raw: dict[str, Any], prefix: str) -> list[str]:
    """Remove the keys cls does not know from raw, in place; returns their dotted names."""
    types_, dropped = _field_types(cls), []
    for name in list(raw):
        if name not in types_:
            del raw[name]
            dropped.append(prefix + name)
        elif _is_section(types_[name]) and isinstance(raw[name], dict):
            dropped += _drop_unknown(types_[name], raw[name], f"{prefix}{name}.")
    return dropped


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """A copy of config with dotted overrides applied, validated."""
    return from_dict(_merge(config.to_dict(), parse_overrides(overrides)))


def resolve_optimizer(config: RunConfig) -> OptimConfig:
    """config.optim with optimizer=auto decided: muon when pretraining a model from its own initialisation
    with whole matrices, adamw otherwise.

    Muon won 8% fewer bits per byte than AdamW in 10 CPU minutes of pretraining (docs/benchmarks.md).
    Fine-tuning keeps AdamW: the weights it starts from were shaped by another optimizer and the
    fine-tuning recipes were tuned with AdamW; LoRA factors are not whole matrices, and FSDP2 shards them.
    """
    o = config.optim
    if o.optimizer != "auto":
        return o
    from_scratch = config.task.kind == "pretrain" and not config.init.from_
    whole = config.lora.rank == 0 and config.train.parallel != "fsdp"
    return dataclasses.replace(o, optimizer="muon" if from_scratch and whole else "adamw")


def save(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def validate(config: RunConfig) -> None:
    """Raise UserError for values that cannot work, naming the key and the fix."""
    m, o, t = config.model, config.optim, config.train

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    for key in ("n_layer", "n_head", "n_kv_head", "d_model", "context_length"):
        need(getattr(m, key) > 0, f"model.{key} must be a positive integer, got {getattr(m, key)}.")
    need(
        m.d_model % m.n_head == 0,
        f"model.n_head ({m.n_head}) must divide model.d_model ({m.d_model}); "
        f"pick e.g. n_head={_divisor_near(m.d_model, m.n_head)}.",
    )
    need(
        m.n_head % m.n_kv_head == 0,
        f"model.n_kv_head ({m.n_kv_head}) must divide model.n_head ({m.n_head}); "
        f"pick e.g. n_kv_head={_divisor_near(m.n_head, m.n_kv_head)}.",
    )
    need(
        (m.d_model // m.n_head) % 2 == 0,
        f"the head size d_model/n_head = {m.d_model // m.n_head} must be even for rotary embeddings; "
        "change model.d_model or model.n_head.",
    )
    need(
        m.vocab_size >= 0 and m.mlp_hidden >= 0,
        "model.vocab_size and model.mlp_hidden must be >= 0 (0 means automatic).",
    )
    need(
        m.attention in ("auto", "sdpa", "matmul"), f"model.attention must be auto, sdpa or matmul, got {m.attention!r}."
    )
    need(m.mlp in MLPS, f"model.mlp must be {' or '.join(MLPS)}, got {m.mlp!r}.")
    need(m.rope_theta > 0 and m.norm_eps > 0, "model.rope_theta and model.norm_eps must be positive.")
    need(o.optimizer in ("auto", "adamw", "muon"), f"optim.optimizer must be auto, adamw or muon, got {o.optimizer!r}.")
    need(o.lr > 0, f"optim.lr must be positive, got {o.lr}.")
    need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be within [0, 1], got {o.min_lr_ratio}.")
    need(
        o.schedule in ("cosine", "wsd", "constant"),
        f"optim.schedule must be cosine, wsd or constant, got {o.schedule!r}.",
    )
    need(0 <= o.decay_fraction <= 1, f"optim.decay_fraction must be within [0, 1], got {o.decay_fraction}.")
    need(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}.")
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}.")
    need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1 and optim.beta2 must be within [0, 1).")
    need(o.eps > 0, f"optim.eps must be positive, got {o.eps}.")
    need(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 turns clipping off), got {o.grad_clip}.")
    for key in (
        "batch_size",
        "grad_accum",
        "eval_every",
        "eval_batches",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
    ):
        need(getattr(t, key) > 0, f"train.{key} must be a positive integer, got {getattr(t, key)}.")
    need(
        t.max_steps >= 0 and t.max_tokens >= 0 and t.max_minutes >= 0,
        "train.max_steps, train.max_tokens and train.max_minutes must be >= 0 (0 means no limit).",
    )
    need(
        t.max_steps > 0 or t.max_minutes > 0,
        "set train.max_steps or train.max_minutes: the lr schedule needs the length of the run.",
    )
    need(t.compile in (True, False, "auto"), f"train.compile must be true, false or auto, got {t.compile!r}.")
    need(t.parallel in ("ddp", "fsdp"), f"train.parallel must be ddp or fsdp, got {t.parallel!r}.")
    need(
        t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"),
        f"train.device must be auto, cpu or cuda, got {t.device!r}.",
    )
    from keel.supervisor.policy import validate_config as validate_supervisor  # the rules live with the policy

    validate_supervisor(config.supervisor)
    w = config.watchdog
    need(
        w.max_restarts >= 0 and w.max_restarts_without_progress >= 1,
        "watchdog.max_restarts must be >= 0 and watchdog.max_restarts_without_progress >= 1.",
    )
    need(w.hang_timeout_s > 0, f"watchdog.hang_timeout_s must be positive, got {w.hang_timeout_s}.")
    need(w.startup_timeout_s > 0, f"watchdog.startup_timeout_s must be positive, got {w.startup_timeout_s}.")
    need(0 <= w.backoff_s <= w.backoff_max_s, "watchdog.backoff_s must be within [0, watchdog.backoff_max_s].")
    need(
        t.dtype in ("auto", "float32", "bfloat16", "float16"),
        f"train.dtype must be auto, float32, bfloat16 or float16, got {t.dtype!r}.",
    )
    need(config.task.kind in TASK_KINDS, f"task.kind must be one of {', '.join(TASK_KINDS)}, got {config.task.kind!r}.")
    need(
        config.sft.loss_on in ("completion", "all"),
        f"sft.loss_on must be completion or all, got {config.sft.loss_on!r}.",
    )
    d = config.dpo
    need(d.loss in ("sigmoid", "ipo", "hinge"), f"dpo.loss must be sigmoid, ipo or hinge, got {d.loss!r}.")
    need(d.beta > 0, f"dpo.beta must be positive, got {d.beta}.")
    need(
        d.displacement_patience > 0,
        f"dpo.displacement_patience must be a positive integer, got {d.displacement_patience}.",
    )
    lo = config.lora
    need(lo.rank >= 0, f"lora.rank must be >= 0 (0 turns LoRA off), got {lo.rank}.")
    need(lo.alpha > 0, f"lora.alpha must be positive, got {lo.alpha}.")
    need(0 <= lo.dropout < 1, f"lora.dropout must be within [0, 1), got {lo.dropout}.")
    need(
        lo.rank == 0 or bool(config.init.from_),
        "lora.rank > 0 adapts a trained model: set init.from=RUN_DIR to the run whose weights the adapters go on.",
    )
    need(
        lo.rank == 0 or o.optimizer != "muon",
        "lora.rank > 0 trains with optim.optimizer=adamw (Muon is for full matrices, not low-rank factors).",
    )
    need(
        config.task.kind != "dpo" or bool(config.init.from_),
        "task.kind=dpo needs a reference model: set init.from=RUN_DIR to the run (usually the SFT run) it starts from.",
    )
    k = config.distill
    need(k.loss in ("forward", "reverse", "jsd"), f"distill.loss must be forward, reverse or jsd, got {k.loss!r}.")
    need(k.temperature > 0, f"distill.temperature must be positive, got {k.temperature}.")
    need(0 <= k.ratio <= 1, f"distill.ratio must be within [0, 1], got {k.ratio}.")
    need(
        0 < k.jsd_beta < 1,
        f"distill.jsd_beta must be within (0, 1) (0 and 1 are forward and reverse), got {k.jsd_beta}.",
    )
    need(k.top_k > 0, f"distill.top_k must be a positive integer, got {k.top_k}.")
    need(k.max_windows >= 0, f"distill.max_windows must be >= 0 (0 means automatic), got {k.max_windows}.")
    need(
        config.task.kind != "distill" or bool(k.teacher),
        "task.kind=distill needs a teacher: set distill.teacher=RUN_DIR to the run the student learns from.",
    )
    _validate_diffusion(config)


def _validate_diffusion(config: RunConfig) -> None:
    """The diffusion section's own rules; what depends on the images (patch size, classes) is checked against
    the data by keel.tasks.diffusion.check_data."""
    f = config.diffusion

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    need(f.objective in OBJECTIVES, f"diffusion.objective must be flow or ddpm, got {f.objective!r}.")
    samplers = OBJECTIVES[f.objective]
    need(
        f.sampler == "auto" or f.sampler in samplers,
        f"diffusion.sampler={f.sampler} does not fit diffusion.objective={f.objective}; use "
        f"{' or '.join(samplers)} (or auto).",
    )
    need(f.patch_size > 0, f"diffusion.patch_size must be a positive integer, got {f.patch_size}.")
    need(0 <= f.class_dropout < 1, f"diffusion.class_dropout must be within [0, 1), got {f.class_dropout}.")
    need(0 <= f.ema_decay < 1, f"diffusion.ema_decay must be within [0, 1), got {f.ema_decay}.")
    need(f.sample_steps > 0, f"diffusion.sample_steps must be a positive integer, got {f.sample_steps}.")
    need(f.guidance >= 0, f"diffusion.guidance must be >= 0 (1 is no guidance), got {f.guidance}.")
    need(f.grid_columns >= 0, f"diffusion.grid_columns must be >= 0 (0 writes no grids), got {f.grid_columns}.")
    if config.task.kind == "diffusion":
        need(
            config.train.parallel == "ddp",
            "task.kind=diffusion keeps its EMA weights whole on every process; use train.parallel=ddp.",
        )
        need(
            not config.init.from_,
            "task.kind=diffusion trains a DiT from scratch; init.from (and LoRA) are for language-model runs, "
            "drop init.from.",
        )


def _divisor_near(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), d))


def reference(sections: bool = False) -> list[Any]:
    """(dotted key, default, help) for every field, for `keel config`.

    With sections=True, the same rows grouped by section as (section key, the section's docstring,
    its rows), the top level ("") first: `keel config --markdown` makes docs/config.md from them.
    """
    rows = []
    groups: dict[str, tuple[str, list[tuple[str, Any, str]]]] = {}

    def walk(cls: type, prefix: str) -> None:
        default = cls()
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())  # its first paragraph, on one line
        own = groups.setdefault(prefix.rstrip("."), (doc, []))[1]
        for f in dataclasses.fields(cls):
            tp = _field_types(cls)[_key(f)]
            if _is_section(tp):
                walk(tp, f"{prefix}{_key(f)}.")
            else:
                rows.append((prefix + _key(f), getattr(default, f.name), f.metadata.get("help", "")))
                own.append(rows[-1])

    walk(RunConfig, "")
    return [(name, doc, own) for name, (doc, own) in groups.items()] if sections else rows
