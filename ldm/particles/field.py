"""Score fields of an RGB image: the only thing the particle engine ever sees.

From an image we keep, per annealing level s (coarse to fine):

    Y     = 0.299 R + 0.587 G + 0.114 B                 luminance (ITU-R BT.601)
    p     = (Y + eps) / sum(Y + eps)                     luminance density over the pixels
    L     = G_{b_s} * log p                              log-density smoothed by the field blur b_s
    score = grad L = (dL/dx, dL/dy)                      per pixel (central differences)
    L_c   = G_{b_s} * log p_c,  p_c = (C + eps) / sum(C + eps),  c in r, g, b

With annealing, b_s = field_blur * 2**(levels - 1 - s): the first level is the coarsest (wide
blurs run on a downsampled grid, see ``smooth_log_density``). The
image itself is dropped once the fields are built; ``log_norm`` (log sum(C + eps) per channel)
is kept so a renderer can undo the per-channel normalisation of the colour densities.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldm.core.errors import UserError
from ldm.evaluate.filters import gaussian_blur

log = logging.getLogger(__name__)

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luminance weights
SCORE = slice(0, 2)  # channels of ScoreField.fields: (dL/dx, dL/dy)
LOG_COLOUR = slice(2, 5)  # channels of ScoreField.fields: (L_r, L_g, L_b)


def resize_longer_side(image: torch.Tensor, max_size: int) -> torch.Tensor:
    """Shrink ``image`` (C, H, W) so its longer side is at most ``max_size`` (antialiased)."""
    h, w = image.shape[-2:]
    scale = max_size / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    out = F.interpolate(
        image[None], size=size, mode="bilinear", antialias=True, align_corners=False
    )
    return out[0].clamp(0, 1)


def check_image(image: torch.Tensor) -> torch.Tensor:
    """``image`` as float (3, H, W) in [0, 1]; uint8 is scaled by 1/255, grey is repeated."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise UserError(f"expected an RGB image of shape (3, H, W), got shape {tuple(image.shape)}")
    if min(image.shape[-2:]) < 4:
        raise UserError(f"image must be at least 4 x 4 pixels, got {tuple(image.shape[-2:])}")
    if image.dtype == torch.uint8:
        image = image.float() / 255
    image = image.float().expand(3, -1, -1)
    if not bool(torch.isfinite(image).all()) or image.min() < 0 or image.max() > 1:
        raise UserError("image values must be finite and in [0, 1]")
    return image


def smooth_log_density(log_p: torch.Tensor, blur: float) -> torch.Tensor:
    """Gaussian blur of (C, H, W) maps; a wide blur runs on a 2^k times smaller grid.

    When blur / 2^k >= 2 px, the maps are area-averaged by 2^k, blurred there with
    sqrt(blur^2 - 4^k / 4) / 2^k and upsampled bilinearly: the area average and the bilinear
    upsampling add about (2^k)^2 / 4 of variance together. Far cheaper for the coarse levels,
    whose structure is much larger than 2^k pixels anyway.
    """
    h, w = log_p.shape[-2:]
    f = 1
    while blur / (2 * f) >= 2.0 and min(h, w) >= 16 * 2 * f:
        f *= 2
    if f == 1:
        return gaussian_blur(log_p, (blur, blur))
    size = (math.ceil(h / f), math.ceil(w / f))
    small = F.interpolate(log_p[None], size=size, mode="area")  # (1, C, h/f, w/f)
    small = gaussian_blur(small, (math.sqrt(blur**2 - f**2 / 4) / f,) * 2)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]


@dataclass(frozen=True)
class ScoreField:
    """Precomputed score and colour log-density fields, one level per annealing stage.

    fields: (S, 5, H, W) float32, channels (dL/dx, dL/dy, L_r, L_g, L_b), levels coarse to fine.
    blurs: the field blur (pixels) of each level.
    log_norm: (3,) log sum(C + eps) of each colour channel.
    log_density: (H, W) the finest smoothed log-density L (for diagnostics and tests).
    eps: the eps of the densities.
    """

    fields: torch.Tensor
    blurs: tuple[float, ...]
    log_norm: torch.Tensor
    log_density: torch.Tensor
    eps: float

    def __post_init__(self) -> None:
        if self.fields.ndim != 4 or self.fields.shape[1] != 5:
            raise ValueError(f"fields must be (levels, 5, H, W), got {tuple(self.fields.shape)}")
        if len(self.blurs) != self.fields.shape[0]:
            raise ValueError(f"{len(self.blurs)} blurs for {self.fields.shape[0]} field levels")

    @classmethod
    def from_image(
        cls, image: torch.Tensor, *, max_size: int = 512, field_blur: float = 1.5,
        levels: int = 1, eps: float = 1e-2,
    ) -> ScoreField:  # fmt: skip
        """Build the fields of an RGB image (3, H, W) in [0, 1] (float or uint8); see module doc."""
        if max_size < 4:
            raise UserError(f"max_size must be >= 4, got {max_size}")
        if field_blur <= 0 or levels < 1 or eps <= 0:
            raise UserError(
                f"need field_blur > 0, levels >= 1, eps > 0; got {field_blur}, {levels}, {eps}"
            )
        rgb = resize_longer_side(check_image(image), max_size)  # (3, H, W)
        luma = torch.tensor(LUMA, dtype=rgb.dtype, device=rgb.device)
        y = torch.einsum("c,chw->hw", luma, rgb)  # Y: (H, W)
        dens = torch.cat([y[None], rgb]) + eps  # (4, H, W): Y, R, G, B (+ eps)
        norm = dens.sum(dim=(1, 2), keepdim=True)
        log_p = torch.log(dens / norm)  # (4, H, W): log p, log p_r, log p_g, log p_b
        blurs = tuple(field_blur * 2.0 ** (levels - 1 - s) for s in range(levels))
        out = []
        for b in blurs:
            smooth = smooth_log_density(log_p, b)  # (4, H, W), per channel
            d_dy, d_dx = torch.gradient(smooth[0])  # score = grad L, per pixel
            out.append(torch.cat([d_dx[None], d_dy[None], smooth[1:]]))
        fields = torch.stack(out).contiguous()  # (S, 5, H, W)
        log.info("score field %dx%d, %d level(s), blurs %s", *y.shape, levels, blurs)
        return cls(fields, blurs, torch.log(norm[1:, 0, 0]), smooth[0], eps)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the field grid."""
        return int(self.fields.shape[-2]), int(self.fields.shape[-1])

    @property
    def levels(self) -> int:
        return int(self.fields.shape[0])

    @property
    def device(self) -> torch.device:
        return self.fields.device
