"""The particle step and frame render as they were before the speed work (plain, allocating).

Kept only for tests: the optimised ``ParticleEngine`` / ``render_frame_uint8`` must give the
same trajectories and frames (within float rounding) as this straightforward version.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm.evaluate.filters import gaussian_blur
from ldm.particles.field import LOG_COLOUR, LUMA, SCORE, ScoreField
from ldm.particles.render import ParticleCode


class ReferenceEngine:
    """x <- reflect(x + k eta score + sqrt(k) sigma z); c <- lerp(c, softmax(beta L_c), alpha)."""

    def __init__(self, field: ScoreField, num_particles: int, steps: int, eta: float = 0.2,
                 alpha: float = 0.05, beta: float = 3.0, sigma0: float = 2.0,
                 deterministic: bool = False, scale_levels: bool = True, seed: int = 0,
                 sort_every: int = 32) -> None:  # fmt: skip
        self.fields, self.steps, self.eta = field.fields, steps, eta
        self.alpha, self.beta, self.sigma0 = alpha, beta, sigma0
        self.deterministic, self.sort_every = deterministic, sort_every
        fine = field.blurs[-1]
        self.level_scale = [(b / fine) ** 2 if scale_levels else 1.0 for b in field.blurs]
        h, w = field.size
        self.upper = torch.tensor([w - 1, h - 1], dtype=torch.float32)
        self.gen = torch.Generator().manual_seed(seed)
        self.positions = torch.rand(num_particles, 2, generator=self.gen) * self.upper
        self.colours = torch.rand(num_particles, 3, generator=self.gen)
        self.t = 0

    def step(self) -> None:
        s = min(self.fields.shape[0] - 1, self.t * self.fields.shape[0] // self.steps)
        k = self.level_scale[s]
        n = self.positions.shape[0]
        grid = (self.positions * (2.0 / self.upper) - 1.0).view(1, 1, n, 2)
        v = F.grid_sample(self.fields[s][None], grid, mode="bilinear", padding_mode="border",
                          align_corners=True).view(5, n)  # fmt: skip
        x = self.positions + k * self.eta * v[SCORE].t()
        sigma = 0.0 if self.deterministic else self.sigma0 * (1 - self.t / self.steps) * k**0.5
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=self.gen)
        x = x.abs()
        x = x - 2 * (x - self.upper).clamp_min(0)
        self.positions = torch.minimum(x.clamp_min(0), self.upper)
        target = torch.softmax(self.beta * v[LOG_COLOUR], dim=0).t()
        self.colours = self.colours + self.alpha * (target - self.colours)
        self.t += 1
        if self.sort_every and self.t % self.sort_every == 0:
            w = self.fields.shape[-1]
            key = self.positions[:, 1].long() * w + self.positions[:, 0].long()
            order = torch.argsort(key, stable=True)
            self.positions, self.colours = self.positions[order], self.colours[order]


def reference_frame(positions: torch.Tensor, colours: torch.Tensor, size: tuple[int, int],
                    blur: float, code: ParticleCode) -> torch.Tensor:  # fmt: skip
    """Decoded frame (H, W, 3) uint8: bilinear splat by index_add_, blur, scale, round."""
    h, w = size
    q = colours.clamp_min(1e-12).pow(1 / code.beta) * torch.exp(code.log_norm - code.log_norm.max())
    rgb = q / (q @ torch.tensor(LUMA))[:, None]  # (N, 3), one unit of luminance each
    acc = torch.zeros(3, h * w)
    x0 = torch.minimum(positions.floor(), torch.tensor([w - 2.0, h - 2.0]))
    f = positions - x0
    for ox in (0, 1):
        for oy in (0, 1):
            wx = f[:, 0] if ox else 1 - f[:, 0]
            wy = f[:, 1] if oy else 1 - f[:, 1]
            idx = ((x0[:, 1] + oy) * w + x0[:, 0] + ox).long()
            acc.index_add_(1, idx, (rgb * (wx * wy)[:, None]).t())
    acc = gaussian_blur(acc.view(3, h, w), (blur, blur))
    frame = (acc * (code.luma_mass() / positions.shape[0]) - code.eps).clamp(0, 1)
    return (frame * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
