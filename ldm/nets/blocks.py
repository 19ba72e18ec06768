"""Building blocks shared by the VAE and the UNet, one code path for 2D and 3D via ``spatial_dims``.

Shapes are written for 3D, ``(B, C, D, H, W)``; in 2D drop ``D``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.core.errors import ConfigError, UserError

MAX_LEVELS = 4  # len(channels) <= 4, i.e. downsampling factor f = 2 ** (levels - 1) in {1, 2, 4, 8}


# --------------------------------------------------------------------------- config checks


def check_spatial_dims(owner: str, spatial_dims: object) -> None:
    if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
        raise ConfigError(f"{owner}.spatial_dims must be 2 or 3, got {spatial_dims!r}")


def as_channel_tuple(owner: str, channels: object, norm_groups: int) -> tuple[int, ...]:
    """Validate a per-level width list and return it as a tuple (YAML/JSON give lists).

    Expects 1 to ``MAX_LEVELS`` positive ints, each divisible by ``norm_groups`` (GroupNorm).
    """
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
        raise UserError(f"{owner}.channels: expected a list of integers, got {channels!r}")
    channels = tuple(channels)
    if not 1 <= len(channels) <= MAX_LEVELS:
        raise UserError(
            f"{owner}.channels: expected 1 to {MAX_LEVELS} levels (downsampling factor "
            f"f = 2 ** (levels - 1) in {{1, 2, 4, 8}}), got {len(channels)} levels {channels!r}"
        )
    for c in channels:
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise UserError(f"{owner}.channels: expected positive integers, got {channels!r}")
        if c % norm_groups != 0:
            raise UserError(
                f"{owner}.channels: every width must be divisible by norm_groups={norm_groups} "
                f"(GroupNorm), got {channels!r}"
            )
    return channels


def check_input(owner: str, x: Tensor, spatial_dims: int, channels: int, factor: int) -> None:
    """Raise ValueError unless ``x`` is ``(B, channels, *spatial)``, sizes % factor == 0: a
    caller's bug (phases check windows and shapes first), shown with its traceback."""
    shape = tuple(x.shape)
    if x.ndim != spatial_dims + 2:
        raise ValueError(
            f"{owner}: expected a {spatial_dims + 2}D tensor (B, C, *{spatial_dims} spatial dims), "
            f"got shape {shape}"
        )
    if shape[1] != channels:
        raise ValueError(f"{owner}: expected {channels} channels, got shape {shape}")
    if any(s % factor != 0 for s in shape[2:]):
        raise ValueError(
            f"{owner}: spatial size {shape[2:]} must be divisible by the downsampling factor "
            f"{factor}, got shape {shape}; pad or crop the input"
        )


# --------------------------------------------------------------------------- layers


class AutocastSafeConv3d(nn.Conv3d):
    """``nn.Conv3d``, except that under CPU autocast an input smaller than the kernel runs in
    float32: oneDNN's bf16 weight gradient of a 3x3x3 convolution over a 2x2x2 map is sometimes
    NaN (torch 2.13: 7-14 of 300 random batches; 4^3 maps, 1x1 and strided or transposed
    convolutions: 0 of 300). Same parameters and state dict as ``nn.Conv3d``."""

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and min(x.shape[2:]) < max(self.kernel_size)
        ):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def conv_nd(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
) -> nn.Module:
    """``nn.Conv2d`` or ``nn.Conv3d`` depending on ``spatial_dims``."""
    conv = AutocastSafeConv3d if spatial_dims == 3 else nn.Conv2d
    return conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding)


def conv3x3(spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """Size-preserving 3x3(x3) convolution."""
    return conv_nd(spatial_dims, in_channels, out_channels, 3, padding=1)


class Downsample(nn.Module):
    """Halve every spatial size with a stride-2 3x3(x3) convolution (even sizes only)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv_nd(spatial_dims, in_channels, out_channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, Cin, D, H, W) -> (B, Cout, D/2, H/2, W/2)``."""
        return self.conv(x)


class Upsample(nn.Module):
    """Double every spatial size with a stride-2 2x2(x2) transposed convolution.

    Kernel == stride means no overlapping taps (no uneven-overlap checkerboard); it is a learned
    depth-to-space and on CPU much cheaper than nearest upsampling followed by a 3x3x3 conv.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        conv_t = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
        self.conv = conv_t(in_channels, out_channels, 2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, Cin, D, H, W) -> (B, Cout, 2D, 2H, 2W)``."""
        return self.conv(x)


class ResBlock(nn.Module):
    """GroupNorm + SiLU residual block, optionally modulated by an embedding (FiLM).

    ``h = conv1(SiLU(GN(x)))``; ``h = GN(h) * (1 + scale) + shift`` with ``(scale, shift)`` a linear
    map of ``SiLU(emb)`` (the "adaptive group norm" of Dhariwal & Nichol 2021, sec. 3);
    ``out = skip(x) + conv2(SiLU(h))``, ``skip`` a 1x1 conv when the width changes.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        norm_groups: int,
        emb_dim: int = 0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels)
        self.conv1 = conv3x3(spatial_dims, in_channels, out_channels)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels)
        self.conv2 = conv3x3(spatial_dims, out_channels, out_channels)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels) if emb_dim > 0 else None
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else conv_nd(spatial_dims, in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        """``x (B, Cin, D, H, W)``, ``emb (B, E)`` or None -> ``(B, Cout, D, H, W)``."""
        # in-place SiLU on tensors nothing else reads: one activation less kept for backward
        h = self.conv1(F.silu(self.norm1(x), inplace=True))  # (B, Cout, D, H, W)
        h = self.norm2(h)
        if self.emb_proj is not None:
            if emb is None:
                raise ValueError("ResBlock built with emb_dim > 0 needs an embedding")
            film = self.emb_proj(F.silu(emb))  # (B, 2 * Cout)
            film = film.reshape(*film.shape, *([1] * (h.ndim - 2)))  # (B, 2 * Cout, 1, 1, 1)
            scale, shift = film.chunk(2, dim=1)
            h = torch.addcmul(shift, h, 1 + scale)  # h (1 + scale) + shift: one fewer tensor
        h = self.conv2(F.silu(h, inplace=True))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over all voxels, pre-GroupNorm, residual.

    Scaled dot-product attention (Vaswani et al. 2017, eq. 1) via
    ``F.scaled_dot_product_attention``; q, k, v keep the head dim contiguous so that the CPU
    flash kernel is used (about 5x faster than the fallback math kernel).
    """

    def __init__(self, channels: int, num_heads: int, norm_groups: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, D, H, W) -> (B, C, D, H, W)``."""
        b, c, *spatial = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        qkv = self.qkv(h).reshape(b, -1, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, C / heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C / heads)
        h = self.proj(h.transpose(1, 2).reshape(b, -1, c))  # (B, N, C)
        return x + h.transpose(1, 2).reshape(b, c, *spatial)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, ``(B,) -> (B, dim)``.

    Transformer position encoding (Vaswani et al. 2017, sec. 3.5) as used for t in DDPM (Ho et al.
    2020, appendix B): ``emb[i] = sin(t * w_i)``, ``emb[half + i] = cos(t * w_i)``,
    ``w_i = max_period ** (-i / half)``; an odd ``dim`` gets one zero column.
    """
    half = dim // 2
    i = torch.arange(half, device=t.device, dtype=torch.float32)
    w = torch.exp(-math.log(max_period) * i / max(half, 1))  # (half,)
    args = t.float()[:, None] * w[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, 2 * half)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb
