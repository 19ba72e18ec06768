"""The built-in default image of particles_gif: a procedural landscape, drawn in code at any size.

A sky gradient with a sun and clouds, two hill lines, a house, trees and flowers: enough large
shapes, edges and colours that a particle reconstruction of it is easy to recognise. Shapes are
anti-aliased (soft one-pixel edges); the grass texture comes from a fixed seed, so the image is
the same on every call.
"""

from __future__ import annotations

import torch

from ldm.core.errors import UserError
from ldm.evaluate.filters import gaussian_blur

Colour = tuple[float, float, float]


def _blend(img: torch.Tensor, mask: torch.Tensor, colour: Colour | torch.Tensor) -> None:
    """Paint ``colour`` over ``img`` (3, H, W) in place with coverage ``mask`` (H, W) in [0, 1]."""
    c = (
        torch.as_tensor(colour, dtype=img.dtype).reshape(3, 1, 1)
        if isinstance(colour, tuple)
        else colour
    )
    img.mul_(1 - mask).add_(mask * c)


def _cover(signed_dist: torch.Tensor, px: float) -> torch.Tensor:
    """Anti-aliased coverage of the region where ``signed_dist`` < 0 (distance in image units)."""
    return (0.5 - signed_dist / px).clamp(0, 1)


def _box(
    u: torch.Tensor, v: torch.Tensor, u0: float, u1: float, v0: float, v1: float
) -> torch.Tensor:
    """Signed distance (inside < 0, approximately) to the box [u0, u1] x [v0, v1]."""
    return torch.maximum(torch.maximum(u0 - u, u - u1), torch.maximum(v0 - v, v - v1))


def _sky_and_sun(u: torch.Tensor, v: torch.Tensor, px: float) -> torch.Tensor:
    """Blue-to-warm sky gradient, a glowing sun and three soft clouds (3, H, W)."""
    top = torch.tensor([0.12, 0.30, 0.72]).reshape(3, 1, 1)
    horizon = torch.tensor([0.98, 0.78, 0.55]).reshape(3, 1, 1)
    s = (v / 0.6).clamp(0, 1) ** 1.4
    img = top * (1 - s) + horizon * s  # (3, H, W)
    d_sun = torch.sqrt((u - 0.76) ** 2 + ((v - 0.22) * 0.75) ** 2)
    glow = torch.exp(-((d_sun / 0.14) ** 2)) * 0.45
    img = img + glow * torch.tensor([1.0, 0.85, 0.4]).reshape(3, 1, 1)
    _blend(img, _cover(d_sun - 0.065, px), (1.0, 0.93, 0.42))
    for cu, cv, w in ((0.22, 0.14, 0.11), (0.48, 0.09, 0.08), (0.55, 0.30, 0.07)):
        puff = sum(
            torch.exp(
                -(((u - cu - du * w) / (0.6 * w)) ** 2 + ((v - cv - dv * w) / (0.25 * w)) ** 2)
            )
            for du, dv in ((-0.6, 0.1), (0.0, -0.15), (0.7, 0.1))
        )
        _blend(img, (puff * 0.9).clamp(0, 0.92), (0.97, 0.97, 1.0))
    return img


def _hills(img: torch.Tensor, u: torch.Tensor, v: torch.Tensor, px: float) -> None:
    """Far blue-green ridge, near green hill with seeded grass texture and a path."""
    far = 0.55 + 0.04 * torch.sin(u * 9.0 + 0.5) + 0.02 * torch.sin(u * 23.0)
    _blend(img, _cover(far - v, px), (0.33, 0.52, 0.50))
    near = 0.66 + 0.05 * torch.sin(u * 5.0 + 2.0) + 0.015 * torch.sin(u * 17.0 + 1.0)
    shade = ((v - near) / 0.35).clamp(0, 1).unsqueeze(0)  # darker towards the bottom
    green = torch.tensor([0.42, 0.74, 0.28]).reshape(3, 1, 1) * (1 - 0.45 * shade)
    g = torch.Generator().manual_seed(1234)
    texture = gaussian_blur(torch.randn(u.shape, generator=g), 1.5) * 0.35  # (H, W)
    green = (green * (1 + texture)).clamp(0, 1)
    _blend(img, _cover(near - v, px), green)
    path_centre = 0.62 + 0.10 * (v - 0.72) / 0.28 + 0.03 * torch.sin(v * 20.0)
    half_width = 0.01 + 0.06 * ((v - 0.72) / 0.28).clamp(0, 1)
    path = torch.maximum((u - path_centre).abs() - half_width, 0.72 - v)
    _blend(img, _cover(path, px), (0.82, 0.70, 0.50))


def _house(img: torch.Tensor, u: torch.Tensor, v: torch.Tensor, px: float) -> None:
    """A red house with a dark roof, a chimney, two lit windows and a door."""
    _blend(img, _cover(_box(u, v, 0.32, 0.35, 0.42, 0.52), px), (0.35, 0.22, 0.20))
    _blend(img, _cover(_box(u, v, 0.16, 0.40, 0.55, 0.78), px), (0.86, 0.32, 0.22))
    # roof: triangle with apex (0.28, 0.40) over the base v = 0.56, u in [0.13, 0.43]
    slope = (0.56 - 0.40) / 0.15
    roof = torch.maximum(v - 0.56, 0.40 + slope * (u - 0.28).abs() - v)
    _blend(img, _cover(roof * 0.7, px), (0.38, 0.16, 0.12))
    for u0 in (0.19, 0.32):
        _blend(img, _cover(_box(u, v, u0, u0 + 0.05, 0.60, 0.66), px), (1.0, 0.90, 0.45))
    _blend(img, _cover(_box(u, v, 0.255, 0.295, 0.66, 0.78), px), (0.30, 0.18, 0.10))


def _trees_and_flowers(
    img: torch.Tensor, u: torch.Tensor, v: torch.Tensor, px: float, aspect: float
) -> None:
    """Three round trees and a scatter of coloured flowers in the grass."""
    for cu, cv, r in ((0.08, 0.58, 0.07), (0.50, 0.62, 0.06), (0.90, 0.66, 0.09)):
        _blend(
            img, _cover(_box(u, v, cu - 0.012, cu + 0.012, cv, cv + 0.16), px), (0.40, 0.25, 0.12)
        )
        d = torch.sqrt((u - cu) ** 2 + ((v - cv) / aspect) ** 2) - r
        light = (0.5 + 2.5 * ((cu - u) + (cv - v) / aspect)).clamp(0, 1).unsqueeze(0)
        crown = torch.tensor([0.10, 0.42, 0.14]).reshape(3, 1, 1) * (0.7 + 0.6 * light)
        _blend(img, _cover(d, px), crown)
    colours = ((1.0, 0.95, 0.3), (0.95, 0.35, 0.6), (1.0, 1.0, 1.0), (0.6, 0.4, 1.0))
    for i in range(28):
        fu = 0.05 + 0.9 * ((i * 0.618034) % 1.0)
        fv = 0.80 + 0.17 * ((i * 0.381966 * 3.1) % 1.0)
        if abs(fu - (0.62 + 0.1 * (fv - 0.72) / 0.28)) < 0.09:
            continue  # keep the path clear
        d = torch.sqrt((u - fu) ** 2 + ((v - fv) / aspect) ** 2) - 0.008
        _blend(img, _cover(d, px), colours[i % len(colours)])


def default_image(height: int = 384, width: int = 512) -> torch.Tensor:
    """The built-in landscape as a float32 RGB image (3, height, width) with values in [0, 1]."""
    if not (16 <= height <= 4096 and 16 <= width <= 4096):
        raise UserError(
            f"default image size must be in [16, 4096] per side, got {height} x {width}"
        )
    v = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    u = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    v, u = torch.meshgrid(v, u, indexing="ij")  # (H, W) each, v down, u right
    px = 1.5 / min(height, width)  # edge softness: about one pixel
    aspect = width / height
    img = _sky_and_sun(u, v, px)
    _hills(img, u, v, px)
    _house(img, u, v, px)
    _trees_and_flowers(img, u, v, px, aspect)
    return img.clamp(0, 1).contiguous()
