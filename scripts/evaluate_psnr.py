"""Phase 3: PSNR/SSIM of the VAE denoiser and classical baselines on the whole test volumes."""

from __future__ import annotations

from ldm.cli import ConfigOption, OverwriteOption, SetOption, make_app, run_phase
from ldm.phases.evaluate_psnr import EvaluateConfig, evaluate_psnr

app = make_app(__doc__)


@app.command()
def main(
    config: ConfigOption = None, set_: SetOption = None, overwrite: OverwriteOption = False
) -> None:
    run_phase(
        "evaluate_psnr", EvaluateConfig, config, set_,
        lambda cfg: evaluate_psnr(cfg, overwrite=overwrite),
    )  # fmt: skip


if __name__ == "__main__":
    app()
