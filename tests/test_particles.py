"""Score fields, the particle engine and the renderer of the particles_gif phase."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.core.errors import UserError
from ldm.evaluate.filters import gaussian_blur
from ldm.particles import ParticleEngine, ScoreField, default_image
from ldm.particles.field import resize_longer_side, smooth_log_density
from ldm.particles.render import ParticleCode, render_frame, side_by_side, splat


def _blob(h: int = 32, w: int = 40, cx: float = 22.0, cy: float = 13.0) -> torch.Tensor:
    """Grey Gaussian blob (sigma 5 px) centred at (cx, cy) on black, (3, H, W)."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    g = torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 5.0**2))
    return g.expand(3, h, w).clone()


def _manual_field(fields: torch.Tensor) -> ScoreField:
    """A ScoreField with the given (S, 5, H, W) channels (no image behind it)."""
    return ScoreField(
        fields, (1.0,) * fields.shape[0], torch.zeros(3), fields[-1, 0].clone(), eps=0.01
    )


# ---------------------------------------------------------------------------------------------
# ScoreField


def test_score_of_gaussian_blob_points_to_its_centre() -> None:
    field = ScoreField.from_image(_blob(), field_blur=1.0, eps=1e-3)
    engine = ParticleEngine(field, num_particles=1, steps=1)
    pts = torch.tensor([[5.0, 3.0], [35.0, 25.0], [22.0, 28.0], [10.0, 13.0], [30.0, 5.0]])
    score = engine.sample(pts)[:, :2]  # (N, 2): dL/dx, dL/dy
    to_centre = torch.tensor([22.0, 13.0]) - pts
    cos = (score * to_centre).sum(1) / (score.norm(dim=1) * to_centre.norm(dim=1))
    assert bool((cos > 0.99).all()), cos
    at_centre = engine.sample(torch.tensor([[22.0, 13.0]]))[0, :2]
    assert at_centre.norm() < 1e-3 * score.norm(dim=1).min()


def test_field_colour_log_densities_and_normalisers() -> None:
    img = torch.zeros(3, 8, 10)
    img[0] = 0.8  # red everywhere, a little green on the right
    img[1, :, 5:] = 0.4
    field = ScoreField.from_image(img, field_blur=0.5, eps=0.01)
    expected = torch.log(img.sum(dim=(1, 2)) + 0.01 * 80)
    assert torch.allclose(field.log_norm, expected)
    # L_c = log((C + eps) / sum(C + eps)) at a pure red pixel; blur keeps the flat areas
    got = field.fields[0, 2:, 4, 1]
    want = torch.log(torch.tensor([0.81 / (0.81 * 80), 0.01 / (0.41 * 40 + 0.4), 1 / 80]))
    assert torch.allclose(got, want, atol=1e-4)


def test_field_levels_go_coarse_to_fine_and_resize_keeps_aspect() -> None:
    field = ScoreField.from_image(default_image(60, 80), max_size=40, field_blur=1.5, levels=3)
    assert field.size == (30, 40) and field.blurs == (6.0, 3.0, 1.5)
    # a coarser level is smoother: smaller score variation
    assert field.fields[0, :2].std() < field.fields[2, :2].std()
    assert resize_longer_side(torch.rand(3, 10, 12), 40).shape == (3, 10, 12)


@pytest.mark.parametrize(
    "image, match",
    [
        (torch.rand(4, 8, 8), "shape"),
        (torch.rand(3, 2, 8), "at least 4 x 4"),
        (torch.full((3, 8, 8), 2.0), r"\[0, 1\]"),
        (torch.full((3, 8, 8), math.nan), "finite"),
    ],
)
def test_field_rejects_bad_images(image: torch.Tensor, match: str) -> None:
    with pytest.raises(UserError, match=match):
        ScoreField.from_image(image)


def test_field_rejects_bad_parameters() -> None:
    with pytest.raises(UserError, match="field_blur > 0"):
        ScoreField.from_image(torch.rand(3, 8, 8), field_blur=0.0)
    with pytest.raises(UserError, match="max_size must be >= 4"):
        ScoreField.from_image(torch.rand(3, 8, 8), max_size=2)


def test_wide_blur_on_a_coarser_grid_matches_direct_blur() -> None:
    torch.manual_seed(0)
    maps = gaussian_blur(torch.randn(2, 96, 128), (4.0, 4.0))  # smooth random maps
    for blur in (8.0, 16.0):
        fast, ref = smooth_log_density(maps, blur), gaussian_blur(maps, (blur, blur))
        inner = (slice(None), slice(32, -32), slice(32, -32))  # borders are handled differently
        err = (fast - ref)[inner].abs().max() / ref.abs().max()
        assert err < 0.03, (blur, float(err))
    assert torch.equal(smooth_log_density(maps, 3.0), gaussian_blur(maps, (3.0, 3.0)))


# ---------------------------------------------------------------------------------------------
# ParticleEngine


def test_bilinear_sample_exact_at_grid_points_and_linear_between() -> None:
    torch.manual_seed(0)
    fields = torch.randn(1, 5, 6, 7)
    engine = ParticleEngine(_manual_field(fields), num_particles=1, steps=1)
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), indexing="ij")
    grid_pts = torch.stack([xs.flatten(), ys.flatten()], 1)
    assert torch.allclose(engine.sample(grid_pts), fields[0].flatten(1).t(), atol=1e-6)
    # a field linear in x and y is reproduced exactly anywhere in between
    lin = (0.5 + 2.0 * xs - 3.0 * ys).expand(1, 5, 6, 7).contiguous()
    engine = ParticleEngine(_manual_field(lin), num_particles=1, steps=1)
    pts = torch.tensor([[0.25, 0.5], [3.7, 2.2], [5.99, 4.01], [6.0, 5.0]])
    want = 0.5 + 2.0 * pts[:, 0] - 3.0 * pts[:, 1]
    assert torch.allclose(engine.sample(pts), want[:, None].expand(4, 5), atol=1e-5)


def test_deterministic_mode_is_reproducible_bit_for_bit() -> None:
    field = ScoreField.from_image(default_image(24, 32), levels=2)
    runs = []
    for _ in range(2):
        e = ParticleEngine(field, num_particles=500, steps=30, eta=0.5, deterministic=True, seed=3)
        e.run()
        runs.append((e.positions, e.colours))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    other = ParticleEngine(field, num_particles=500, steps=30, deterministic=True, seed=4)
    other.run()
    assert not torch.equal(other.positions, runs[0][0])


def test_sorting_particles_only_changes_their_order() -> None:
    field = ScoreField.from_image(default_image(24, 32), levels=2)
    kw = dict(num_particles=300, steps=40, deterministic=True, seed=1)
    plain, sorted_ = (
        ParticleEngine(field, sort_every=0, **kw),
        ParticleEngine(field, sort_every=8, **kw),
    )
    plain.run()
    sorted_.run()
    rows = [torch.cat([e.positions, e.colours], 1) for e in (plain, sorted_)]
    assert not torch.equal(rows[0], rows[1])
    # the same particles (up to float rounding in a different SIMD lane), in another order
    same = [torch.unique(r, dim=0) for r in rows]  # rows sorted lexicographically
    assert same[0].shape == (300, 5) and torch.allclose(same[0], same[1], atol=1e-5)
    pix = sorted_.positions[:, 1].long() * 32 + sorted_.positions[:, 0].long()
    assert bool((pix.diff() >= 0).all())  # sorted at t = 40


def test_lookup_in_two_batches_gives_the_same_run() -> None:
    """With 2+ threads the step looks the particles up as two grid_sample batches: no change."""
    field = ScoreField.from_image(default_image(24, 32), levels=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        for blocks in (2, 1):
            e = ParticleEngine(field, num_particles=400, steps=40, seed=2, sort_every=8)
            assert e._blocks == 2
            e._blocks = blocks
            e.run()
            runs.append((e.positions, e.colours))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert ParticleEngine(field, num_particles=401, steps=1)._blocks == 1  # odd N: one batch


def test_noise_drawn_ahead_on_the_worker_equals_noise_drawn_in_the_step() -> None:
    from concurrent.futures import ThreadPoolExecutor

    field = ScoreField.from_image(default_image(24, 32), levels=2)
    runs = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        for ahead in (0, 1, 8):  # 0: every draw in the step itself
            e = ParticleEngine(field, num_particles=300, steps=30, seed=7, sort_every=8,
                               noise_ahead=ahead, noise_executor=pool)  # fmt: skip
            e.run()
            assert not e._pending
            runs.append(e.positions)
        assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
        # t moved from outside: draws made ahead for other steps are not used for the new one
        e = ParticleEngine(field, num_particles=300, steps=30, seed=7, noise_ahead=3,
                           noise_executor=pool)  # fmt: skip
        e.step()
        assert [s for s, _ in e._pending] == [1, 2, 3]
        e.t = 20
        e.step()
        assert [s for s, _ in e._pending] == [21, 22, 23]
        e.t = 22  # forward into the drawn range: the draw made for step 22 is the one used
        e.step()
        assert [s for s, _ in e._pending] == [23, 24, 25]
    with pytest.raises(UserError, match="noise_ahead >= 0"):
        ParticleEngine(field, num_particles=10, steps=5, noise_ahead=-1)


def test_noise_follows_the_sigma_schedule() -> None:
    field = _manual_field(torch.zeros(2, 5, 20, 20))  # no score: moves are pure noise
    e = ParticleEngine(field, num_particles=20_000, steps=10, sigma0=0.4, seed=0)
    assert e.sigma(0) == pytest.approx(0.4) and e.sigma(5) == pytest.approx(0.2)
    assert [e.level(t) for t in (0, 4, 5, 9)] == [0, 0, 1, 1]
    start = e.positions.clone()
    e.step()
    inside = ((start > 2) & (start < 17)).all(1)  # far from the reflecting border
    step_std = (e.positions - start)[inside].std()
    assert step_std == pytest.approx(0.4, rel=0.03)
    det = ParticleEngine(field, num_particles=10, steps=10, deterministic=True)
    before = det.positions.clone()
    det.step()
    assert det.sigma(0) == 0.0 and torch.equal(det.positions, before)


def test_colours_converge_to_softmax_target_on_uniform_field() -> None:
    fields = torch.zeros(1, 5, 10, 12)
    log_c = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    fields[0, 2:] = log_c[:, None, None]
    e = ParticleEngine(
        _manual_field(fields), num_particles=50, steps=40, alpha=0.2, beta=2.0, sort_every=0
    )
    c0 = e.colours.clone()
    e.run()
    target = torch.softmax(2.0 * log_c, 0)  # (0.5^2, 0.3^2, 0.2^2) / sum
    want = target + (c0 - target) * 0.8**40  # c <- c + alpha (target - c), 40 times
    assert torch.allclose(e.colours, want, atol=1e-5)
    assert torch.allclose(e.colours, target.expand(50, 3), atol=1e-3)


def test_particles_stay_inside_the_image() -> None:
    fields = torch.zeros(1, 5, 16, 24)
    fields[0, 0] = 3.0  # strong push to the right and down
    fields[0, 1] = 2.0
    e = ParticleEngine(_manual_field(fields), num_particles=2000, steps=50, eta=2.0, sigma0=2.0)
    e.run()
    assert bool((e.positions >= 0).all()) and bool((e.positions <= torch.tensor([23, 15])).all())


def test_density_after_deterministic_run_correlates_with_luminance() -> None:
    img = default_image(48, 64)
    field = ScoreField.from_image(img, field_blur=1.5, levels=3)
    e = ParticleEngine(field, num_particles=4000, steps=300, eta=0.1, deterministic=True)
    luma = gaussian_blur(0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2], (2.0, 2.0))

    def corr() -> float:
        dens = gaussian_blur(splat(e.positions, torch.ones(4000, 1), field.size)[0], (2.0, 2.0))
        return float(torch.corrcoef(torch.stack([dens.flatten(), luma.flatten()]))[0, 1])

    start = corr()
    e.run()
    assert start < 0.2 and corr() > 0.7, (start, corr())


def test_engine_rejects_bad_arguments() -> None:
    field = _manual_field(torch.zeros(1, 5, 4, 4))
    with pytest.raises(UserError, match="num_particles >= 1"):
        ParticleEngine(field, num_particles=0, steps=5)
    with pytest.raises(UserError, match="sort_every >= 0"):
        ParticleEngine(field, num_particles=5, steps=5, sort_every=-1)
    with pytest.raises(UserError, match="alpha in"):
        ParticleEngine(field, num_particles=5, steps=5, alpha=1.5)
    with pytest.raises(UserError, match="every must be >= 1"):
        ParticleEngine(field, num_particles=5, steps=5).run(every=0)
    e = ParticleEngine(field, num_particles=5, steps=1)
    e.step()
    with pytest.raises(RuntimeError, match="already run"):
        e.step()


# ---------------------------------------------------------------------------------------------
# rendering


def test_splat_is_bilinear_and_keeps_mass() -> None:
    out = splat(torch.tensor([[1.25, 2.5], [4.0, 3.0]]), torch.tensor([[1.0], [2.0]]), (4, 5))
    want = torch.zeros(4, 5)
    want[2, 1], want[2, 2], want[3, 1], want[3, 2] = 0.375, 0.125, 0.375, 0.125
    want[3, 4] = 2.0  # exactly on the last pixel
    assert torch.allclose(out[0], want) and out.sum() == pytest.approx(3.0)


def test_decoded_render_recovers_a_flat_colour_exactly() -> None:
    """One particle per pixel, colour = the softmax code of C: the render decodes back to C."""
    h, w, beta, eps = 9, 11, 3.0, 0.01
    colour = torch.tensor([0.6, 0.4, 0.2])
    img = colour[:, None, None].expand(3, h, w)
    field = ScoreField.from_image(img, field_blur=0.5, eps=eps)
    ys, xs = torch.meshgrid(torch.arange(h * 1.0), torch.arange(w * 1.0), indexing="ij")
    pos = torch.stack([xs.flatten(), ys.flatten()], 1)
    code_c = torch.softmax(beta * field.fields[0, 2:, 0, 0], 0).expand(h * w, 3)
    frame = render_frame(pos, code_c, field.size, 1.0, ParticleCode.from_field(field, beta))
    assert torch.allclose(frame, img, atol=1e-4)
    # raw colours only hold relative channel densities: a flat colour codes as grey (then white)
    raw = render_frame(pos, code_c, field.size, 1.0)
    assert torch.allclose(raw, torch.ones_like(raw), atol=1e-5)


def test_side_by_side_needs_one_height() -> None:
    both = side_by_side([torch.zeros(3, 4, 5), torch.ones(3, 4, 2)], gap=3)
    assert both.shape == (3, 4, 10) and bool((both[:, :, 5:8] == 1).all())
    with pytest.raises(UserError, match="one height"):
        side_by_side([torch.zeros(3, 4, 5), torch.zeros(3, 5, 5)])


def test_default_image_is_fixed_rgb_in_range() -> None:
    a, b = default_image(24, 32), default_image(24, 32)
    assert a.shape == (3, 24, 32) and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1 and a.std() > 0.1
    with pytest.raises(UserError, match=r"\[16, 4096\]"):
        default_image(8, 32)


# ---------------------------------------------------------------------------------------------
# the optimised paths against the plain reference (tests/helpers/particles_reference.py)


def test_optimised_engine_and_render_match_the_plain_reference() -> None:
    from ldm.phases.particles_gif import simulate
    from tests.helpers.particles_reference import ReferenceEngine, reference_frame

    field = ScoreField.from_image(default_image(48, 64), field_blur=1.5, levels=3)
    kw = dict(num_particles=3000, steps=60, eta=0.2, sigma0=2.0, seed=5, sort_every=16)
    code = ParticleCode.from_field(field, 3.0)
    threads = torch.get_num_threads()
    run = simulate(field, kw, 2.0, 10, code)  # frames on a worker thread, one thread per op
    assert torch.get_num_threads() == threads  # the caller's setting is restored
    ref = ReferenceEngine(field, **kw)
    frames = [reference_frame(ref.positions, ref.colours, field.size, 2.0, code)]
    for _ in range(60):
        ref.step()
        if ref.t % 10 == 0:
            frames.append(reference_frame(ref.positions, ref.colours, field.size, 2.0, code))
    engine = ParticleEngine(field, **kw)
    engine.run()
    assert torch.allclose(engine.positions, ref.positions, atol=1e-3)
    assert torch.allclose(engine.colours, ref.colours, atol=1e-4)
    assert len(run.frames) == len(frames) == 7
    for got, want in zip(run.frames, frames):
        diff = (got.int() - want.int()).abs()
        assert got.shape == want.shape and int(diff.max()) <= 1
        assert float(diff.float().mean()) < 0.01
    assert float(frames[-1].float().std()) > 10  # a real picture, not a blank frame


def test_a_failing_frame_stops_the_run_with_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames render on a worker thread: its error reaches the caller (no hang, no lost error)
    and the caller's thread count is restored."""
    import ldm.phases.particles_gif as phase

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("render failed")
        return torch.zeros(24, 32, 3, dtype=torch.uint8)

    monkeypatch.setattr(phase, "render_frame_uint8", broken)
    field = ScoreField.from_image(default_image(24, 32), field_blur=1.0, levels=1)
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="render failed"):
        phase.simulate(field, dict(num_particles=200, steps=100, seed=0), 1.0, 2, None)
    assert torch.get_num_threads() == threads
    assert len(calls) < 51  # stopped soon after the failure, not after all 51 frames
