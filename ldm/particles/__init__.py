"""Score-field particles: noise becomes an image by following grad log p (particles_gif phase).

``ScoreField`` is built once from an image; ``ParticleEngine`` moves particles using only those
fields; ``render`` turns particles into frames, GIFs and PNGs. The phase itself is
``ldm.phases.particles_gif``.
"""

from __future__ import annotations

from ldm.particles.default_image import default_image
from ldm.particles.engine import ParticleEngine
from ldm.particles.field import ScoreField
from ldm.particles.render import ParticleCode, render_frame, splat, write_gif

__all__ = [
    "ParticleCode",
    "ParticleEngine",
    "ScoreField",
    "default_image",
    "render_frame",
    "splat",
    "write_gif",
]
