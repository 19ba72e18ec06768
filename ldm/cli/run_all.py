"""run_all: every phase in order on one profile (demo: configs/demo/, default: configs/,
mri: configs/mri/, the MNI152 brain template; needs the ``mri`` extra)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ldm.core.config import REPO_ROOT, load_config
from ldm.core.errors import UserError
from ldm.core.registry import PHASES, Phase, PhaseResult
from ldm.evaluate.baselines import LABELS
from ldm.train.run_dir import Interrupted

log = logging.getLogger(__name__)
PROFILES = ("demo", "default", "mri")
PROFILE_DIRS = {"demo": "demo", "default": "", "mri": "mri"}


class PhaseFailed(UserError):
    """A phase stopped the run; the message names the phase."""


@dataclass
class RunAllReport:
    rows: list[tuple[str, float, PhaseResult]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(r[1] for r in self.rows)


def config_path(profile: str, phase: Phase) -> Path:
    if profile not in PROFILES:
        raise UserError(f"--profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    folder = REPO_ROOT / "configs" / PROFILE_DIRS[profile]
    return folder / f"{phase.name}.yaml"


def select(names: list[str] | None) -> list[Phase]:
    if not names:
        return list(PHASES)
    known = {p.name: p for p in PHASES}
    for n in names:
        if n not in known:
            raise UserError(f"unknown phase {n!r}; phases: {', '.join(known)}")
    return [p for p in PHASES if p.name in names]


def run_all(
    profile: str = "demo",
    phases: list[str] | None = None,
    overwrite: bool = False,
    on_phase=None,
) -> RunAllReport:
    """Run the phases in order; ``on_phase(i, n, name, seconds, result)`` after each one.

    The demo profile writes only under dataset/demo, checkpoint/demo and results/demo and
    always starts those over; the default and mri profiles replace nothing unless ``overwrite``
    (training resumes). The mri profile writes under dataset/mri, checkpoint/mri, results/mri.
    """
    chosen = select(phases)
    report = RunAllReport()
    for i, phase in enumerate(chosen, 1):
        cfg = load_config(phase.config_cls(), config_path(profile, phase))
        t0 = time.perf_counter()
        try:
            result = phase.run_fn()(cfg, overwrite=overwrite or profile == "demo")
        except (Interrupted, KeyboardInterrupt):  # Ctrl-C / SIGTERM: exit 130, say how to go on
            if profile == "demo":
                how = "rerun to start the demo over"
            else:
                rest = ",".join(p.name for p in chosen[i - 1 :])
                how = (f"rerun with --phases {rest} to go on (training resumes from last.pt"
                       f"{'; leave out --overwrite, which starts over' if overwrite else ''})")
            raise Interrupted(f"run_all interrupted in {phase.name}; {how}") from None
        except UserError as e:
            raise PhaseFailed(f"phase {phase.name} failed: {e}") from None
        seconds = time.perf_counter() - t0
        report.rows.append((phase.name, seconds, result))
        if on_phase is not None:
            on_phase(i, len(chosen), phase.name, seconds, result)
    return report


def _pictures(result: PhaseResult) -> list[Path]:
    found: list[Path] = []
    for out in result.outputs:
        out = Path(out)
        if out.is_file() and out.suffix in (".png", ".gif"):
            found.append(out)
        elif out.is_dir():
            found += sorted(p for p in out.rglob("*") if p.suffix in (".png", ".gif"))
    return found


def summary_table(report: RunAllReport) -> str:
    """Closing summary: quality table (Baseline, classical, restorer, LDM sample and mean,
    oracle), the calibration of the LDM's std, particles, pictures."""
    results = {name: result for name, _, result in report.rows}
    lines: list[str] = []
    rows: list[tuple[str, dict]] = []
    calibration = None
    if "predict_ldm" in results and results["predict_ldm"].metrics.get("mean"):
        mean = results["predict_ldm"].metrics["mean"]
        rows += [(LABELS.get(k, k), v) for k, v in mean.items() if "psnr" in v]
        calibration = mean.get("uncertainty")
    if "evaluate_psnr" in results:
        mean = results["evaluate_psnr"].metrics["mean"]
        have = {name for name, _ in rows}
        for key, scores in mean.items():
            label = LABELS.get(key, key)
            if not any(label.startswith(h) for h in have):
                rows.append((label, scores))
    if rows:
        lines.append(f"{'test volumes (original units)':<34}{'PSNR dB':>9}{'SSIM':>8}")
        lines += [f"{label:<34}{s['psnr']:>9.2f}{s['ssim']:>8.3f}" for label, s in rows]
    if calibration:
        lines.append(f"LDM uncertainty: variance-to-error {calibration['var_err_ratio']:.2f}, AUSE "
                     f"{calibration['ause']:.3f} (random order {calibration['ause_random']:.3f})")
    if "particles_gif" in results:
        m = results["particles_gif"].metrics
        lines.append(f"particles: final render vs blurred source PSNR {m['psnr_db']:.2f} dB, "
                     f"SSIM {m['ssim']:.3f}")  # fmt: skip
    pictures = [p for _, _, r in report.rows for p in _pictures(r)]
    if pictures:
        lines.append("pictures:")
        lines += [f"  {p}" for p in pictures[:40]]
        if len(pictures) > 40:
            lines.append(f"  ... and {len(pictures) - 40} more")
    return "\n".join(lines)


def format_report(profile: str, report: RunAllReport) -> str:
    """The closing text of run_all: one line per phase, then the summary table."""
    lines = [f"\nrun_all ({profile}): {len(report.rows)} phases in {report.seconds:.1f} s"]
    lines += [f"  {name:<20} {seconds:7.1f} s   {result.headline}"
              for name, seconds, result in report.rows]  # fmt: skip
    table = summary_table(report)
    if table:
        lines.append("\n" + table)
    return "\n".join(lines)
