"""The decoder-only language model: a Llama-shaped GPT.

Token embedding, then `n_layer` pre-norm blocks (RMSNorm -> grouped-query attention with rotary
positions -> residual, RMSNorm -> SwiGLU or ReLU² MLP -> residual), a final RMSNorm `norm_f` and the output
projection `lm_head`. The layout and the rotary convention are those of Hugging Face Llama, so
`keel.models.hf` maps weights one to one, without permuting heads.

Device, precision, compilation and activation checkpointing are applied from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.config import ModelConfig
from keel.errors import UserError


def mlp_hidden_size(config: ModelConfig) -> int:
    """config.mlp_hidden, or when it is 0: 8/3 d_model (swiglu) or 4 d_model (relu2), rounded up to a
    multiple of 64."""
    # 8/3 keeps the SwiGLU MLP (three matrices) at the parameter count of a 4x two-matrix MLP.
    thirds = 8 if config.mlp == "swiglu" else 12
    return config.mlp_hidden or 64 * math.ceil(thirds * config.d_model / (3 * 64))


def mlp_matrices(config: ModelConfig) -> int:
    """Weight matrices of one MLP: gate, up and down (swiglu) or up and down (relu2)."""
    return 3 if config.mlp == "swiglu" else 2


def num_kv_heads(config: ModelConfig) -> int:
    """config.n_kv_head, or n_head (plain multi-head attention) when it is 0."""
    return config.n_kv_head or config.n_head


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (length, head_dim), in Llama's split-halves layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hs/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (T, hs/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hs): dims i and i + hs/2 rotate together
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) by the angles of its positions, cos and sin (T, hs) or per row (B, 1, T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    rotated = torch.cat((-x2, x1), dim=-1)  # Llama's rotate_half
    return x * cos + rotated * sin


# Up to this context, CPU training is faster with the scores as a plain matrix than with SDPA's CPU
# flash kernel. bench/throughput.py, mid model, 2048 tokens per step, compiled: +21% at T=256, +18%
# at T=512, -5% at T=1024 (eager: +2% at T=256, -4% at T=512). Training runs long enough are compiled.
MATMUL_ATTENTION_MAX_CONTEXT = 512


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs)) v over q, k, v (B, nh, T, hs), scores materialised, softmax in float32;
    causal masks the future, else every position sees every other.

    k and v have as many heads as q here (the caller repeats shared key/value heads).
    """
    B, n_head, T, head_dim = q.shape
    if causal:
        mask = torch.full((T, T), float("-inf"), device=q.device).triu(1).to(q.dtype)  # (T, T), -inf above the diagonal
    else:
        mask = torch.zeros((T, T), device=q.device, dtype=q.dtype)  # (T, T)
    # baddbmm adds the mask inside the matmul instead of in a second pass over the scores; under
    # torch.compile it also stays a matmul rather than being rewritten into the flash kernel.
    scores = torch.baddbmm(
        mask.expand(B * n_head, T, T),
        q.flatten(0, 1),
        k.flatten(0, 1).transpose(1, 2),
        alpha=1.0 / math.sqrt(head_dim),
    )  # (B*nh, T, T)
    weights = scores.float().softmax(dim=-1).to(v.dtype)  # float32 softmax: bf16 sums of T terms lose too much
    return (weights @ v.flatten(0, 1)).view(B, n_head, T, head_dim)


class KVCache:
    """Keys and values of one attention layer, preallocated for incremental decoding."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.length = 0  # positions filled so far
        self.k: torch.Tensor | None = None  # (B, n_kv_head, max_length, hs), allocated by the first update
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, n_kv_head, T, hs); return all cached keys and values (B, n_kv_head, length, hs)."""
        B, n_kv_head, T, head_dim = k.shape
        # Attention masks causally only within one call, so it is either the prompt or one new token.
        assert self.length == 0 or T == 1, "after the prompt, decode one token at a time"
        assert self.length + T <= self.max_length, "KV cache is full"
        if self.k is None:
            self.k = k.new_empty(B, n_kv_head, self.max_length, head_dim)
            self.v = v.new_empty(B, n_kv_head, self.max_length, head_dim)
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


class Attention(nn.Module):
    """Grouped-query self-attention: n_head query heads share n_kv_head key/value heads.

    Causal for the language model; `causal=False` lets every position see every other (the DiT's patches).
    """

    def __init__(self, config: ModelConfig, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.n_head = config.n_head
        self.n_kv_head = num_kv_heads(config)
        self.head_dim = config.d_model // config.n_head
        self.q_proj = nn.Linear(config.d_model, config.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * self.head_dim, config.d_model, bias=False)
        self.kernel = config.attention
        # QK-norm bounds the attention logits, which otherwise grow and saturate the softmax at high lr.
        self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """cos, sin: the rotary tables of the positions (None: no rotation, positions are in x already);
        mask (B, 1, T, T), True where a query may attend, replaces the causal mask (packed rows)."""
        B, T, C = x.shape  # batch, sequence length, d_model
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        # QK-norm and rotation in float32 (a no-op outside autocast): in bf16 the rotation of late
        # positions loses its precision, and nn.RMSNorm has no fused kernel for bf16 input with
        # float32 weights. Attention itself runs in the dtype of v again.
        q, k = self.q_norm(q.float()), self.k_norm(k.float())
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = q.to(v.dtype), k.to(v.dtype)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nkv, S, hs), S = cached positions including these T
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_head != self.n_head)
        elif cache is None and self._use_matmul(x.device, T):
            if self.n_kv_head != self.n_head:  # give every query head its own copy of its shared k/v head
                k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))
            y = matmul_attention(q, k, v, self.causal)  # (B, nh, T, hs)
        else:
            # One new token attends to everything cached, so the mask is needed only when T > 1.
            # enable_gqa lets SDPA share each k/v head among n_head/n_kv_head query heads without copying
            # them. On CPU (torch 2.13, bf16) attention alone ran ~13% faster than with repeat_interleave.
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=self.causal and T > 1, enable_gqa=self.n_kv_head != self.n_head
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.o_proj(y)

    def _use_matmul(self, device: torch.device, T: int) -> bool:
        if self.kernel == "auto":
            return device.type == "cpu" and T <= MATMUL_ATTENTION_MAX_CONTEXT
        return self.kernel == "matmul"


class MLP(nn.Module):
    """Feed-forward: SwiGLU, down(silu(gate(x)) * up(x)), or ReLU², down(relu(up(x))²) (model.mlp).

    ReLU² is relu(a) * a, so Llama's gated MLP with a ReLU and gate = up computes it exactly: that is
    how `keel.models.hf` exports it."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = mlp_hidden_size(config)
        self.gated = config.mlp == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(config.d_model, hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, C)
        return self.down_proj(F.relu(self.up_proj(x)).square())  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        # nn.RMSNorm equals Hugging Face's LlamaRMSNorm bit for bit in float32.
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, mask)
        x = x + self.mlp(self.mlp_norm(x))
        return x


class GPT(nn.Module):
    """Decoder-only language model built from a ModelConfig (vocab_size already resolved)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        assert config.vocab_size > 0, "resolve model.vocab_size from the tokenizer before building the model"
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(
            config.d_model // config.n_head, config.context_length, config.rope_theta
        )  # (T, hs) each
        # Not persistent: they follow from the config, so checkpoints need not carry them.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every weight in place; tied weights stay tied."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        # Each block adds two outputs to the residual stream; scaling them keeps its variance
        # independent of depth at initialisation (GPT-2).
        for block in self.blocks:
            for weight in (block.attn.o_proj.weight, block.mlp.down_proj.weight):
                nn.init.normal_(weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def hidden_states(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """idx (B, T) token ids -> (B, T, C) output of the last block (the input of norm_f).

        positions (B, T) and segments (B, T) describe packed rows: several examples side by side,
        each with positions restarting at 0 and attending only within its own segment id. Without
        them every row is one sequence at positions 0..T-1 (or after the cached ones).
        kv_caches (one per block) make the call continue the sequence cached so far; `generate` uses it.
        """
        B, T = idx.shape
        start = kv_caches[0].length if kv_caches else 0
        assert start + T <= self.config.context_length, (
            f"sequence of {start + T} tokens exceeds context_length {self.config.context_length}"
        )
        if positions is None:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]  # (T, hs)
        else:
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (B, 1, T, hs)
        mask = None
        if segments is not None:  # block-diagonal causal: a position sees the earlier ones of its own segment
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, T)
            mask = (segments[:, :, None] == segments[:, None, :]) & causal  # (B, T, T)
            mask = mask.unsqueeze(1)  # (B, 1, T, T), shared by the heads
        x = self.embed(idx)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, kv_caches[i] if kv_caches else None, mask)
        return x

    def forward(self, idx: torch.Tensor, kv_caches: list[KVCache] | None = None) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, V). Training never calls this: the tasks take the loss
        straight from `hidden_states` through the chunked head (keel.tasks.lm), never holding
        the (B, T, V) logits."""
        return self.lm_head(self.norm_f(self.hidden_states(idx, kv_caches=kv_caches)))

    # ---- size and cost ---------------------------------------------------------------------

    @staticmethod
    def count_params(config: ModelConfig, include_embedding: bool = True) -> int:
        """Parameters of GPT(config), from the config alone.

        include_embedding=False leaves out the vocabulary-sized matrices (token embedding and, when
        untied, lm_head): the "non-embedding" count N of scaling-law fits.
        """
        d, head_dim = config.d_model, config.d_model // config.n_head
        attention = d * config.n_head * head_dim * 2 + d * num_kv_heads(config) * head_dim * 2  # q, o; k, v
        qk_norm = 2 * head_dim if config.qk_norm else 0
        mlp = mlp_matrices(config) * d * mlp_hidden_size(config)
        per_block = attention + qk_norm + mlp + 2 * d  # + two RMSNorm weights
        total = config.n_layer * per_block + d  # + norm_f
        if include_embedding:
            total += config.vocab_size * d * (1 if config.tie_embeddings else 2)
        return total

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameters of this model (a tied matrix counted once); see count_params for the split."""
        total = sum(p.numel() for p in self.parameters())
        if not include_embedding:
            total -= self.embed.weight.numel() + (0 if self.config.tie_embeddings else self.lm_head.weight.numel())
        return total

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token at full context, for MFU; see count_flops_per_token."""
        return self.count_flops_per_token(self.config)

    @staticmethod
    def count_flops_per_token(config: ModelConfig) -> int:
        """Training FLOPs (forward + backward) per token at full context of GPT(config), from the config alone.

        nanoGPT's / PaLM's estimate, 6 N + 12 L H Q T:
        - 6 N: every weight in a matmul costs 2 FLOPs per token forward and 4 backward. N counts
          the non-embedding parameters plus lm_head (V x d): lm_head is a matmul, the embedding is a
          lookup that costs nothing, so an untied embedding table is not counted. With tied
          embeddings N equals the total parameter count, as in nanoGPT. The norm weights are
          included for simplicity (they are 1e-3 of N at most).
        - 12 L H Q T: the attention scores q.k and the weighted sum of v, 2 matmuls x 2 FLOPs x 3
          (forward + backward) over T = context_length keys per query, in each of L layers with
          H query heads of size Q. It counts the full T x T square, as PaLM does, not the causal half.
        """
        c = config
        n = GPT.count_params(c, include_embedding=False) + c.vocab_size * c.d_model
        return 6 * n + 12 * c.n_layer * c.n_head * (c.d_model // c.n_head) * c.context_length

    # ---- sampling --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eot_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue the prompts idx (B, T0); return (B, T0 + n) with n <= max_new_tokens new tokens.

        Generation stops (rather than crops) when the sequence fills context_length, because rotary
        positions are absolute and sliding the window would mean recomputing the whole cache. It also
        stops once every row has produced eot_id; rows that finished earlier are padded with eot_id.
        temperature 0 is greedy; top_k and top_p (nucleus) filter before sampling.
        """
        B, T0 = idx.shape
        if T0 == 0:
            raise UserError("the prompt is empty; start it with at least one token, e.g. the end-of-text token.")
        if T0 > self.config.context_length:
            raise UserError(
                f"the prompt has {T0} tokens but the model's context_length is {self.config.context_length}; "
                "shorten the prompt."
            )
        num_new = min(max_new_tokens, self.config.context_length - T0)
        if num_new <= 0:
            return idx
        caches = [KVCache(T0 + num_new) for _ in self.blocks]
        logits = self(idx, kv_caches=caches)  # prefill: (B, T0, V)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        new_tokens = []
        for step in range(num_new):
            next_token = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
            if eot_id is not None:
                next_token = next_token.masked_fill(done, eot_id)
                done |= next_token == eot_id
            new_tokens.append(next_token)
            if step == num_new - 1 or (eot_id is not None and bool(done.all())):
                break
            logits = self(next_token[:, None], kv_caches=caches)  # (B, 1, V)
        return torch.cat((idx, torch.stack(new_tokens, dim=1)), dim=1)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from logits (B, V) -> (B,)."""
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 is greedy), got {temperature}.")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be a positive integer, got {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must be within (0, 1], got {top_p}.")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None:
        # Keep the most likely tokens until their mass reaches top_p (the first one always stays).
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the strictly more likely tokens
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
