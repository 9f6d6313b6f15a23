"""The diffusion transformer (DiT, Peebles & Xie 2023), built from keel's attention and MLP.

An image (B, C, H, W) is cut into P x P patches, one token each (T = HW / P^2), with a fixed 2D
sin-cos position embedding added. The noise level t and the class y are embedded and summed into
one conditioning vector c, which steers every block through adaLN-Zero: the block's two norms
are shifted and scaled by projections of c and its two residual branches gated by a third, and
those projections start at zero, so every block starts as the identity. The final layer's
projection starts at zero too: the untrained model outputs exactly zero. Attention is keel's
grouped-query attention, non-causal and without rotary positions; the MLP is keel's SwiGLU.

Class id `num_classes` is the null class, the label of an image whose class was dropped in
training: the unconditional model that classifier-free guidance contrasts with the conditional one.
A model of an unlabelled set (num_classes 0) has no class embedding at all.

Device, precision, compilation and the EMA copy of the weights are applied from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.config import ModelConfig
from keel.models.gpt import MLP, Attention

TIME_FREQUENCIES = 256  # sinusoidal features of t before the timestep MLP (DiT's frequency_embedding_size)


@dataclass(frozen=True)
class DiTConfig:
    """The trunk's shape (n_layer, d_model, n_head, n_kv_head, mlp_hidden, qk_norm, attention) and the images'."""

    trunk: ModelConfig
    channels: int
    height: int
    width: int
    patch_size: int
    num_classes: int  # 0: unlabelled images, no class conditioning

    @property
    def num_patches(self) -> int:
        return (self.height // self.patch_size) * (self.width // self.patch_size)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t (B,) float, on a 0..1000 scale -> (B, dim), as in DiT and ADM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2D position embedding (grid_h * grid_w, dim): half the channels encode the row, half the column."""
    assert dim % 4 == 0, "the 2D sin-cos embedding needs d_model divisible by 4"
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")  # (h, w) each
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)

    def encode(positions: torch.Tensor) -> torch.Tensor:  # (h, w) -> (h*w, dim/2)
        angles = positions.flatten().double()[:, None] * omega[None]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)

    return torch.cat((encode(rows), encode(cols)), dim=-1).float()  # (h*w, dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, T, C) shifted and scaled per image by shift, scale (B, 1, C)."""
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """Pre-norm block whose norms and residual gates are set by the conditioning (adaLN-Zero)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.d_model
        self.attn_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(config, causal=False)
        self.mlp_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(config)
        self.modulation = nn.Linear(d, 6 * d)  # silu(c) -> shift, scale, gate of each branch

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) tokens, c (B, C) the conditioning after its SiLU."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c)[:, None].chunk(6, dim=-1)  # (B, 1, C)
        x = x + gate_a * self.attn(modulate(self.attn_norm(x), shift_a, scale_a))
        x = x + gate_m * self.mlp(modulate(self.mlp_norm(x), shift_m, scale_m))
        return x


class DiT(nn.Module):
    """Noisy image, noise level and class -> a prediction of the image's size (velocity or noise)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        d, p = config.trunk.d_model, config.patch_size
        self.patch_embed = nn.Conv2d(config.channels, d, kernel_size=p, stride=p)  # one token per P x P patch
        self.time_mlp = nn.Sequential(nn.Linear(TIME_FREQUENCIES, d), nn.SiLU(), nn.Linear(d, d))
        # num_classes + 1 rows: the last one is the null class of classifier-free guidance
        self.class_embed = nn.Embedding(config.num_classes + 1, d) if config.num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(config.trunk) for _ in range(config.trunk.n_layer))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(d, 2 * d)  # silu(c) -> shift, scale of the final norm
        self.final_proj = nn.Linear(d, p * p * config.channels)  # token -> its patch's pixels
        grid = sincos_2d(d, config.height // p, config.width // p)  # (T, C)
        self.register_buffer("pos_embed", grid, persistent=False)  # follows from the config
        self.init_weights()

    def init_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linear layers, N(0, 0.02) embeddings, and zeros for every
        modulation and the final projection (adaLN-Zero), so each block is the identity at step 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.time_mlp[0], self.time_mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        for layer in [*(block.modulation for block in self.blocks), self.final_modulation, self.final_proj]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def hidden_states(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W), t (B,) on a 0..1000 scale, y (B,) class ids (num_classes = null; ignored without
        classes) -> the last block's output (B, T, D) and the conditioning after its SiLU (B, D)."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, T, D), patches in row-major order
        tokens = tokens + self.pos_embed
        c = self.time_mlp(timestep_embedding(t, TIME_FREQUENCIES))  # (B, D)
        if self.class_embed is not None:
            c = c + self.class_embed(y)
        c = F.silu(c)  # every modulation reads silu(c)
        for block in self.blocks:
            tokens = block(tokens, c)
        return tokens, c

    def output(self, hidden: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The final adaLN layer and projection, patches put back in place: (B, T, D) -> (B, C, H, W)."""
        shift, scale = self.final_modulation(c)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        patches = self.final_proj(modulate(self.final_norm(hidden), shift, scale))  # (B, T, P*P*C)
        cfg, p = self.config, self.config.patch_size
        B, h, w = hidden.shape[0], cfg.height // p, cfg.width // p
        patches = patches.view(B, h, w, p, p, cfg.channels)  # (B, h, w, P, P, C)
        return patches.permute(0, 5, 1, 3, 2, 4).reshape(B, cfg.channels, cfg.height, cfg.width)  # (B, C, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.output(*self.hidden_states(x, t, y))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
