"""Particles that rebuild an image by following a precomputed score field (Langevin-style).

The engine is built from a ``ScoreField`` and never sees the image. One step, t = 0 .. T-1:

    1. v     = bilinear(fields[s(t)], x)             score and L_c at the continuous positions
    2. x    <- x + k_s eta score(x) + sqrt(k_s) sigma(t) z
                                                      z ~ N(0, I); sigma(t) = sigma0 (1 - t / T)
                                                      (stochastic), 0 (deterministic)
    3. x    <- reflect x into [0, W-1] x [0, H-1]     positions stay inside the image
    4. c*    = softmax(beta * L_c(x))                 target colour over the channels r, g, b
    5. c    <- c + alpha * (target - c)

| symbol | variable                                                                       |
|--------|--------------------------------------------------------------------------------|
| x      | positions (N, 2), (x, y) in pixels, pixel centres at integers                  |
| c      | colours (N, 3)                                                                 |
| s(t)   | level: min(S - 1, t S // T), coarse to fine when the field has S > 1 levels    |
| k_s    | level_scale: (b_s / b_fine)^2, the level's blur relative to the finest; 1 for  |
|        | the finest level, and for every level when ``scale_levels`` is off             |

With one level (or k_s = 1) this is the unadjusted Langevin algorithm x <- x + eta grad log p +
sqrt(2 eta) z (Roberts & Tweedie 1996) with a free, annealed noise scale: sigma0 = sqrt(2 eta)
samples p at the start, and the decay to 0 sharpens towards the modes of p at the end. Scaling a
level's step with its blur squared is annealed Langevin dynamics (Song & Ermon 2019, "Generative
Modeling by Estimating Gradients of the Data Distribution", Alg. 1: alpha_i ~ sigma_i^2): the
temperature sigma^2 / (2 eta) stays the same, but coarse levels move particles across the image,
so large flat regions also reach their density before the finest level refines the details.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ldm.errors import UserError
from ldm.particles.field import LOG_COLOUR, SCORE, ScoreField

log = logging.getLogger(__name__)


class ParticleEngine:
    """Vectorised, seeded particle system driven only by a ``ScoreField`` (see module doc).

    State: ``positions`` (N, 2) and ``colours`` (N, 3), step counter ``t``. Every ``sort_every``
    steps the particles are reordered by pixel, which keeps field lookups cache-friendly; the
    order carries no meaning (0 keeps the order, e.g. to follow single particles).
    """

    def __init__(
        self, field: ScoreField, *, num_particles: int, steps: int, eta: float = 0.2,
        alpha: float = 0.05, beta: float = 3.0, sigma0: float = 2.0, deterministic: bool = False,
        scale_levels: bool = True, seed: int = 0, sort_every: int = 32,
    ) -> None:  # fmt: skip
        if num_particles < 1 or steps < 1 or sort_every < 0:
            raise UserError(
                f"need num_particles >= 1, steps >= 1, sort_every >= 0; "
                f"got {num_particles}, {steps}, {sort_every}"
            )
        if eta <= 0 or not 0 < alpha <= 1 or beta <= 0 or sigma0 < 0:
            raise UserError(
                f"need eta > 0, alpha in (0, 1], beta > 0, sigma0 >= 0; "
                f"got {eta}, {alpha}, {beta}, {sigma0}"
            )
        self.fields = field.fields  # (S, 5, H, W): the engine's only view of the image
        self.num_particles, self.steps = num_particles, steps
        self.eta, self.alpha, self.beta, self.sigma0 = eta, alpha, beta, sigma0
        self.deterministic = deterministic
        self.sort_every = sort_every  # reorder particles by pixel every k steps; 0 = never
        # k_s = (b_s / b_fine)^2 per level: NCSN's alpha_i ~ sigma_i^2, 1 for the finest level
        fine = field.blurs[-1]
        self.level_scale = tuple((b / fine) ** 2 if scale_levels else 1.0 for b in field.blurs)
        device = self.fields.device
        h, w = field.size
        self._upper = torch.tensor([w - 1, h - 1], dtype=torch.float32, device=device)  # (2,)
        self._zero = torch.zeros_like(self._upper)
        self._to_grid = 2.0 / self._upper.clamp_min(1)  # pixels -> grid_sample coordinates
        # the step's own copy of the fields, colour channels pre-multiplied by beta, one
        # (1, 5, H, W) view per level: softmax(beta L_c) needs no multiply per step
        scaled = self.fields.clone()
        scaled[:, LOG_COLOUR] *= beta
        self._step_fields = [scaled[s].unsqueeze(0) for s in range(scaled.shape[0])]
        # buffers reused by every step (the step allocates only grid_sample's output)
        n = num_particles
        self._grid = torch.empty(1, 1, n, 2, device=device)  # grid_sample coordinates
        self._noise = torch.empty(n, 2, device=device)  # z, and the reflection overshoot
        self._gen = torch.Generator(device=device).manual_seed(seed)
        u = torch.rand(num_particles, 2, generator=self._gen, device=device)
        self._pos = u * self._upper  # (N, 2): uniform over the image
        colours = torch.rand(num_particles, 3, generator=self._gen, device=device)  # (N, 3)
        self._col = colours.t().contiguous()  # stored (3, N): the colour update is contiguous
        self.t = 0

    @property
    def positions(self) -> torch.Tensor:
        """(N, 2) particle positions (x, y) in pixels; updated in place by ``step``."""
        return self._pos

    @property
    def colours(self) -> torch.Tensor:
        """(N, 3) particle colours: a view of the (3, N) storage, updated in place by ``step``."""
        return self._col.t()

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the field grid."""
        return int(self.fields.shape[-2]), int(self.fields.shape[-1])

    def sigma(self, t: int) -> float:
        """Noise scale sigma(t) = sigma0 * (1 - t / T); 0 in deterministic mode."""
        return 0.0 if self.deterministic else self.sigma0 * (1.0 - t / self.steps)

    def level(self, t: int) -> int:
        """Index of the field level used at step t (coarse to fine over the run)."""
        return min(self.fields.shape[0] - 1, t * self.fields.shape[0] // self.steps)

    def sample(self, positions: torch.Tensor, level: int = -1) -> torch.Tensor:
        """Bilinear interpolation of all field channels at ``positions`` (N, 2) -> (N, 5)."""
        return self._sample(positions, level).t()

    def _sample(self, positions: torch.Tensor, level: int) -> torch.Tensor:
        """Channel-first ``sample``: (5, N), one grid_sample call for score and colour fields."""
        return self._lookup(self.fields[level].unsqueeze(0), positions)

    def _lookup(self, fields: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """grid_sample of ``fields`` (1, 5, H, W) at ``positions`` (N, 2) -> (5, N)."""
        n = positions.shape[0]
        grid = self._grid if n == self.num_particles else positions.new_empty(1, 1, n, 2)
        torch.mul(positions, self._to_grid, out=grid.view(n, 2)).sub_(1.0)  # in [-1, 1]
        out = F.grid_sample(
            fields, grid, mode="bilinear", padding_mode="border", align_corners=True
        )  # (1, 5, 1, N)
        return out.view(5, n)

    def _reflect(self, x: torch.Tensor) -> torch.Tensor:
        """Mirror positions at the image border in place: -a -> a, M + a -> M - a, else as is."""
        x.abs_()
        over = torch.sub(x, self._upper, out=self._noise).clamp_min_(0)  # z is used up here
        x.sub_(over, alpha=2.0)  # exact for x in [0, M]
        return x.clamp_(min=self._zero, max=self._upper)  # jumps beyond one width

    def _sort(self) -> None:
        """Reorder particles by pixel (row-major) so field lookups touch memory in order."""
        h, w = self.size
        key = self.positions[:, 1].long() * w + self.positions[:, 0].long()  # (N,)
        order = torch.argsort(key, stable=True)
        self._pos = self._pos[order]
        self._col = self._col[:, order]

    def step(self) -> None:
        """Advance all particles by one step (steps 1-5 of the module doc)."""
        if self.t >= self.steps:
            raise RuntimeError(f"the engine has already run its {self.steps} steps")
        level = self.level(self.t)
        k = self.level_scale[level]
        x = self._pos  # (N, 2), updated in place
        v = self._lookup(self._step_fields[level], x)  # (5, N): score, beta L_c
        x.add_(v[SCORE].t(), alpha=k * self.eta)  # x + k eta score(x)
        sigma = self.sigma(self.t) * k**0.5
        if sigma > 0:
            z = torch.randn(x.shape, generator=self._gen, out=self._noise)
            x.add_(z, alpha=sigma)  # + sqrt(k) sigma(t) z
        self._reflect(x)
        target = torch.softmax(v[LOG_COLOUR], dim=0)  # (3, N); channel-first is fast
        self._col.lerp_(target, self.alpha)  # c + alpha * (target - c), all (3, N)
        self.t += 1
        if self.sort_every and self.t % self.sort_every == 0:
            self._sort()

    def run(
        self,
        callback: Callable[[ParticleEngine], None] | None = None,
        every: int = 1,
        progress: bool = False,
    ) -> None:
        """Run the remaining steps; call ``callback(self)`` after every ``every``-th step."""
        if every < 1:
            raise UserError(f"every must be >= 1, got {every}")
        for _ in tqdm(range(self.t, self.steps), desc="particles", disable=not progress):
            self.step()
            if callback is not None and (self.t % every == 0 or self.t == self.steps):
                callback(self)
