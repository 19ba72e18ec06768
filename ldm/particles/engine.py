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
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ldm.core.errors import UserError
from ldm.particles.field import LOG_COLOUR, SCORE, ScoreField

log = logging.getLogger(__name__)

_WORKER: ThreadPoolExecutor | None = None
_WORKER_LOCK = threading.Lock()


def _worker() -> ThreadPoolExecutor:
    """One worker thread, shared by all engines, that draws the next step's noise (torch ops
    release the GIL, so it overlaps with the step). Only it touches an engine's generator while
    a draw is pending, and draws run in submission order: runs stay reproducible."""
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="particle-noise")
        return _WORKER


class ParticleEngine:
    """Vectorised, seeded particle system driven only by a ``ScoreField`` (see module doc).

    State: ``positions`` (N, 2) and ``colours`` (N, 3), views of channel-first (2, N) / (3, N)
    storage, and the step counter ``t``. Every ``sort_every``
    steps the particles are reordered by pixel, which keeps field lookups cache-friendly; the
    order carries no meaning (0 keeps the order, e.g. to follow single particles).

    On the CPU the noise of the next ``noise_ahead`` steps is drawn on ``noise_executor`` (one
    thread; default a shared worker) while the step runs: the same generator, in step order, so
    runs stay reproducible. A caller that renders frames on that same thread (particles_gif)
    draws several steps ahead, so the steps go on while a frame renders.
    """

    def __init__(
        self, field: ScoreField, *, num_particles: int, steps: int, eta: float = 0.2,
        alpha: float = 0.05, beta: float = 3.0, sigma0: float = 2.0, deterministic: bool = False,
        scale_levels: bool = True, seed: int = 0, sort_every: int = 32, noise_ahead: int = 1,
        noise_executor: ThreadPoolExecutor | None = None,
    ) -> None:  # fmt: skip
        if num_particles < 1 or steps < 1 or sort_every < 0 or noise_ahead < 0:
            raise UserError(
                f"need num_particles >= 1, steps >= 1, sort_every >= 0, noise_ahead >= 0; "
                f"got {num_particles}, {steps}, {sort_every}, {noise_ahead}"
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
        self._upper = torch.tensor([[w - 1], [h - 1]], dtype=torch.float32, device=device)  # (2, 1)
        self._twice_upper = 2 * self._upper  # reflection: min(x, 2 M - x)
        self._to_grid = 2.0 / self._upper.clamp_min(1)  # pixels -> grid_sample coordinates
        self._minus_one = torch.full((2, 1), -1.0, device=device)
        # the step's own fields, one (1, 4, H, W) tensor per level: the score and
        # beta (L_r - L_b), beta (L_g - L_b). softmax is unchanged by subtracting beta L_b from
        # all three logits, and bilinear interpolation is linear, so softmax(beta L_c(x)) =
        # softmax(beta (L_r - L_b)(x), beta (L_g - L_b)(x), 0): one channel fewer to look up
        colour = self.fields[:, LOG_COLOUR]
        diff = (colour[:, :2] - colour[:, 2:]) * beta  # (S, 2, H, W)
        step_fields = torch.cat([self.fields[:, SCORE], diff], dim=1)
        self._step_fields = [step_fields[s].unsqueeze(0) for s in range(step_fields.shape[0])]
        # buffers reused by every step, channel-first (2, N) like the positions: every
        # elementwise op of a step reads and writes contiguous rows
        n = num_particles
        self._grid = torch.empty(2, n, device=device)  # grid_sample coordinates
        # grid_sample's CPU kernel runs its batch items in parallel, never the points of one:
        # with 2+ threads the step looks up two halves of the particles as a batch of two
        two = device.type == "cpu" and torch.get_num_threads() > 1 and n % 2 == 0
        self._blocks = 2 if two else 1
        self._scratch = torch.empty(2, n, device=device)  # 2 M - x of the reflection
        self._logits = torch.zeros(3, n, device=device)  # beta (L_c - L_b) at x; row b stays 0
        self._gen = torch.Generator(device=device).manual_seed(seed)
        u = torch.rand(num_particles, 2, generator=self._gen, device=device)
        self._pos = (u * self._upper.t()).t().contiguous()  # (2, N): uniform over the image
        colours = torch.rand(num_particles, 3, generator=self._gen, device=device)  # (N, 3)
        self._col = colours.t().contiguous()  # stored (3, N): the colour update is contiguous
        # z of the next steps, drawn (N, 2) from the generator as always, scaled and transposed
        # to (2, N) on a worker thread (CPU) while the current step runs; step s uses buffer
        # s % (ahead + 1), so a draw never overwrites the noise of a step not yet taken
        self._draw = torch.empty(n, 2, device=device)
        self._ahead = noise_ahead
        self._noise = [torch.empty(2, n, device=device) for _ in range(noise_ahead + 1)]
        self._pending: deque[tuple[int, Future[torch.Tensor]]] = deque()  # (step, draw)
        self._executor = noise_executor
        self._prefetch = device.type == "cpu" and noise_ahead > 0
        self.t = 0

    @property
    def positions(self) -> torch.Tensor:
        """(N, 2) particle positions (x, y) in pixels: a view of the (2, N) storage."""
        return self._pos.t()

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
        """grid_sample of ``fields`` (1, C, H, W) at ``positions`` (N, 2) -> (C, N)."""
        return self._lookup_t(fields, positions.t())

    def _lookup_t(self, fields: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``_lookup`` at channel-first positions ``pos`` (2, N); grid_sample reads the (N, 2)
        grid as a transposed view, so no interleaved copy is made."""
        n = pos.shape[1]
        grid = self._grid if n == self.num_particles else pos.new_empty(2, n)
        torch.addcmul(self._minus_one, pos, self._to_grid, out=grid)  # in [-1, 1]
        out = F.grid_sample(
            fields, grid.t()[None, None], mode="bilinear", padding_mode="border",
            align_corners=True,
        )  # fmt: skip  # (1, C, 1, N)
        return out.view(-1, n)

    def _reflect(self, x: torch.Tensor) -> torch.Tensor:
        """Mirror positions (2, N) at the image border in place: -a -> a, M + a -> M - a.

        min(|x|, 2 M - |x|) is |x| itself inside [0, M] and 2 M - |x| (one rounding, as
        x - 2 (x - M)) beyond; the clamp catches jumps beyond one width.
        """
        x.abs_()
        torch.sub(self._twice_upper, x, out=self._scratch)
        return torch.minimum(x, self._scratch, out=x).clamp_min_(0)

    def _sort(self) -> None:
        """Reorder particles by pixel (row-major) so field lookups touch memory in order."""
        h, w = self.size
        key = self._pos[1].long() * w + self._pos[0].long()  # (N,)
        order = torch.argsort(key, stable=True)
        self._pos = self._pos[:, order]
        self._col = self._col[:, order]

    def _draw_noise(self, t: int, buf: torch.Tensor) -> torch.Tensor:
        """sqrt(k_s) sigma(t) z into ``buf`` (2, N), z ~ N(0, I) drawn as an (N, 2) tensor."""
        z = torch.randn(self._draw.shape, generator=self._gen, out=self._draw)
        return torch.mul(z.t(), self.sigma(t) * self.level_scale[self.level(t)] ** 0.5, out=buf)

    def _noise_for(self, t: int) -> torch.Tensor:
        """The scaled noise of step t; tops the draws ahead up to step t + ``noise_ahead``."""
        pending = self._pending
        while pending and pending[0][0] != t:  # t was changed from outside: drop stale draws
            pending.popleft()[1].result()  # (let each finish before the generator is reused)
        if pending:
            z = pending.popleft()[1].result()
        else:  # first step, or t was changed from outside: draw here
            z = self._draw_noise(t, self._noise[t % len(self._noise)])
        nxt = t + 1 + len(pending)
        while (
            self._prefetch and len(pending) < self._ahead and nxt < self.steps
            and self.sigma(nxt) > 0
        ):  # fmt: skip
            buf = self._noise[nxt % len(self._noise)]
            pending.append((nxt, (self._executor or _worker()).submit(self._draw_noise, nxt, buf)))
            nxt += 1
        return z

    def step(self) -> None:
        """Advance all particles by one step (steps 1-5 of the module doc)."""
        if self.t >= self.steps:
            raise RuntimeError(f"the engine has already run its {self.steps} steps")
        level = self.level(self.t)
        k = self.level_scale[level]
        x = self._pos  # (2, N), updated in place
        b = self._blocks  # (., N) = (., b, N / b): the particles as b lookup batches
        grid = torch.addcmul(self._minus_one, x, self._to_grid, out=self._grid)  # in [-1, 1]
        fields = self._step_fields[level].expand(b, -1, -1, -1)  # (b, 4, H, W), no copy
        out = F.grid_sample(
            fields, grid.view(2, b, -1).permute(1, 2, 0).unsqueeze(1), mode="bilinear",
            padding_mode="border", align_corners=True,
        )  # fmt: skip  # (b, 4, 1, N / b)
        v = out.view(b, 4, -1).transpose(0, 1)  # (4, b, N / b): score, beta (L_rg - L_b)
        x.view(2, b, -1).add_(v[SCORE], alpha=k * self.eta)  # x + k eta score(x)
        if self.sigma(self.t) > 0:
            x.add_(self._noise_for(self.t))  # + sqrt(k) sigma(t) z
        self._reflect(x)
        self._logits.view(3, b, -1)[:2] = v[2:]
        target = torch.softmax(self._logits, dim=0)  # (3, N); channel-first is fast
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
