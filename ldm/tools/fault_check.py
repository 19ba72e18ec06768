"""Fault injection on the demo configs: SIGKILL each long phase at random moments, rerun it.

Checks after every kill:
- every completed earlier result is byte-identical (sha256 of every file outside the phase's
  output);
- the killed phase left nothing a later phase accepts: a killed first run leaves no output (the
  next phase refuses with exit 2), a killed ``--overwrite`` run leaves the old output
  byte-identical, a killed training run leaves only loadable checkpoints;
- a training phase resumed after the kills ends with weights equal (``torch.equal``) to an
  uninterrupted run of the same config.

Used by ``scripts/fault_check.py``; not a unit test (it takes minutes).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.core.checkpoint import load_checkpoint
from ldm.core.errors import UserError
from ldm.core.files import check_writable_folder

ROOT = Path(__file__).resolve().parents[2]  # ldm/tools/fault_check.py -> the checkout


@dataclass
class Fault:
    phase: str
    mode: str  # fresh | overwrite | resume
    killed_at: float  # seconds after start
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def survived(self) -> bool:
        return all(self.checks.values())


@dataclass(frozen=True)
class PhaseSpec:
    name: str
    output: str  # relative to the workspace
    args: Callable[[Path, Path], list[str]]  # (workspace, output) -> --set arguments
    training: bool = False
    next_phase: str | None = None  # refuses a killed first run of this phase


def _sets(*pairs: str) -> list[str]:
    return [x for p in pairs for x in ("--set", p)]


TRAIN = ("train.save_every=10", "train.val_every=10", "train.log_every=5", "train.device=cpu",
         "train.max_minutes=0")  # fmt: skip

PHASES = [
    PhaseSpec("prepare_data", "dataset", lambda w, o: _sets(f"out_dir={o}"),
              next_phase="train_vae_pair"),  # fmt: skip
    PhaseSpec(
        "train_vae_pair", "vae",
        lambda w, o: _sets(f"data_dir={w / 'dataset'}", f"out_dir={o}", "train.steps=40", *TRAIN),
        training=True, next_phase="prepare_latents",
    ),  # fmt: skip
    PhaseSpec(
        "prepare_latents", "dataset/latents",
        lambda w, o: _sets(f"data_dir={w / 'dataset'}", f"vae_checkpoint={w / 'vae/best.pt'}"),
        next_phase="train_diffusion",
    ),  # fmt: skip
    PhaseSpec(
        "train_diffusion", "diffusion",
        lambda w, o: _sets(f"data_dir={w / 'dataset'}", f"vae_checkpoint={w / 'vae/best.pt'}",
                           f"out_dir={o}", "train.steps=40", "val_samples=4", "val_steps=5",
                           *TRAIN),
        training=True, next_phase="predict_ldm",
    ),  # fmt: skip
    PhaseSpec(
        "evaluate_psnr", "evaluate",
        lambda w, o: _sets(f"data_dir={w / 'dataset'}", f"vae_checkpoint={w / 'vae/best.pt'}",
                           f"out_dir={o}"),
    ),  # fmt: skip
    PhaseSpec(
        "predict_ldm", "predict",
        lambda w, o: _sets(f"data_dir={w / 'dataset'}", f"vae_checkpoint={w / 'vae/best.pt'}",
                           f"diffusion_checkpoint={w / 'diffusion/best.pt'}", f"out_dir={o}",
                           "sampler.steps=5", "num_samples=1"),
    ),  # fmt: skip
]
NEXT_ARGS = {  # how the next phase is pointed at a killed first run's output
    "train_vae_pair": lambda w: _sets(f"data_dir={w / 'dataset'}", f"out_dir={w / 'probe'}",
                                      "train.steps=1", "train.device=cpu"),
    "prepare_latents": lambda w: _sets(f"data_dir={w / 'dataset'}",
                                       f"vae_checkpoint={w / 'vae/best.pt'}"),
    "train_diffusion": lambda w: _sets(f"data_dir={w / 'dataset'}",
                                       f"vae_checkpoint={w / 'vae/best.pt'}",
                                       f"out_dir={w / 'probe'}", "train.steps=1",
                                       "train.device=cpu"),
    "predict_ldm": lambda w: _sets(f"data_dir={w / 'dataset'}",
                                   f"vae_checkpoint={w / 'vae/best.pt'}",
                                   f"diffusion_checkpoint={w / 'diffusion/best.pt'}",
                                   f"out_dir={w / 'probe'}", "sampler.steps=2"),
}  # fmt: skip


def _command(phase: str, args: list[str], overwrite: bool) -> list[str]:
    cmd = [sys.executable, str(ROOT / "scripts" / f"{phase}.py"),
           "--config", str(ROOT / "configs" / "demo" / f"{phase}.yaml"), *args]  # fmt: skip
    return cmd + (["--overwrite"] if overwrite else [])


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LDM_LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT)}  # fmt: skip


def run_subprocess(phase: str, args: list[str], overwrite: bool = False) -> tuple[int, str, float]:
    """Run a phase script in a child process: (exit code, output, seconds)."""
    t0 = time.perf_counter()
    p = subprocess.run(_command(phase, args, overwrite), capture_output=True, text=True,
                       env=_env(), cwd=ROOT)  # fmt: skip
    return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0


def kill_phase(
    phase: str, args: list[str], after: float, overwrite: bool = False
) -> tuple[float, bool]:
    """Start the phase and SIGKILL it ``after`` seconds later; (seconds it ran, whether it
    ended by itself first)."""
    proc = subprocess.Popen(_command(phase, args, overwrite), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT)  # fmt: skip
    t0 = time.perf_counter()
    try:
        proc.wait(timeout=after)
        ended = True
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ended = False
    return time.perf_counter() - t0, ended


def snapshot(root: Path, exclude: Path | None = None) -> dict[str, str]:
    """sha256 of every file under ``root`` (except under ``exclude``)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not (exclude and (p == exclude or exclude in p.parents)):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _loadable_run(run_dir: Path, kind: str) -> bool:
    for name in ("last.pt", "best.pt"):
        if (run_dir / name).exists():
            try:
                load_checkpoint(run_dir / name, kind)
            except Exception:
                return False
    return True  # stale .tmp-* names a kill leaves are never read, and removed on the rerun


def _leftovers(out: Path) -> list[Path]:
    """Temp files/folders of this output that a kill left and the rerun did not remove."""
    hidden = [*out.parent.glob(f".{out.name}.*"), *out.parent.glob(".tmp-*")]
    return hidden + [p for p in out.rglob(".tmp-*")] if out.exists() else hidden


def _weights_equal(a: Path, b: Path, kind: str) -> bool:
    x, y = load_checkpoint(a, kind), load_checkpoint(b, kind)
    return all(
        x[part].keys() == y[part].keys()
        and all(torch.equal(x[part][k], y[part][k]) for k in x[part])
        for part in ("model", "ema")
    ) and x["step"] == y["step"]


def check_phase(spec: PhaseSpec, ws: Path, kills: int, rng: random.Random,
                log: Callable[[str], None]) -> list[Fault]:  # fmt: skip
    """Inject ``kills`` SIGKILLs into one phase (after its inputs exist); returns the faults."""
    out = ws / spec.output
    faults: list[Fault] = []
    kind = "vae" if spec.name == "train_vae_pair" else "diffusion"
    # an uninterrupted reference run: its duration bounds the kill moments
    ref = ws / "reference" / spec.name
    code, text, duration = run_subprocess(spec.name, spec.args(ws, ref))
    if spec.name == "prepare_latents":  # writes into the dataset: the reference is the real run
        shutil.rmtree(out, ignore_errors=True)
    if code != 0:
        raise RuntimeError(f"reference run of {spec.name} failed:\n{text}")
    earlier = snapshot(ws, exclude=out)
    earlier = {k: v for k, v in earlier.items() if not k.startswith(("reference/", "probe"))}

    def earlier_intact() -> bool:
        now = snapshot(ws, exclude=out)
        return all(now.get(k) == v for k, v in earlier.items())

    for i in range(kills):
        at = rng.uniform(0.15, 0.9) * duration
        if spec.training:
            mode = "resume" if i else "fresh"
            killed, ended = kill_phase(spec.name, spec.args(ws, out), at)
            fault = Fault(spec.name, mode, killed)
            fault.checks["earlier intact"] = earlier_intact()
            fault.checks["checkpoints loadable"] = _loadable_run(out, kind)
        else:
            fresh = not out.exists()
            before = snapshot(out) if not fresh else {}
            killed, ended = kill_phase(spec.name, spec.args(ws, out), at, overwrite=not fresh)
            fault = Fault(spec.name, "fresh" if fresh else "overwrite", killed)
            fault.checks["earlier intact"] = earlier_intact()
            if fresh and out.exists() and snapshot(out):  # the run finished before the kill
                rerun = run_subprocess(spec.name, spec.args(ws, out), overwrite=True)
                fault.checks["complete output"] = rerun[0] == 0
            elif fresh and spec.next_phase:
                code, text, _ = run_subprocess(spec.next_phase, NEXT_ARGS[spec.next_phase](ws))
                fault.checks["next phase refuses"] = code == 2 and "error:" in text
            elif not fresh:
                if ended:  # the phase finished before the kill came: its output replaced
                    fault.checks["finished run's output complete"] = set(snapshot(out)) == set(
                        before
                    )
                else:  # the old output, or (killed after its commit, before the process
                    # exited) a complete new one: then no staged or swapped-out folder is left
                    now = snapshot(out)
                    swap = [*ws.glob(f".{out.name}.*.tmp"), *ws.glob(f".{out.name}.old-*")]
                    committed = not swap and set(now) == set(before)
                    fault.checks["old output intact"] = now == before or committed
            code, _, took = run_subprocess(spec.name, spec.args(ws, out), overwrite=out.exists())
            fault.checks["rerun completes"] = code == 0
            # the next kill lands within a rerun's time: reruns can be much shorter than the
            # first run (evaluate_psnr reuses the classical tuning cached in the dataset)
            duration = took
            fault.checks["no leftovers"] = not _leftovers(out)
        faults.append(fault)
        when = f"ended by itself at {killed:5.1f} s" if ended else f"killed at {killed:5.1f} s"
        log(f"  {spec.name:<16} {fault.mode:<9} {when}  "
            f"{'ok' if fault.survived else 'FAILED ' + str(fault.checks)}")  # fmt: skip
    if spec.training:
        code, text, _ = run_subprocess(spec.name, spec.args(ws, out))
        same = code == 0 and _weights_equal(out / "last.pt", ref / "last.pt", kind)
        faults[-1].checks["resumed == uninterrupted"] = same
        # --overwrite killed before its first save keeps the finished run
        before = snapshot(out)
        killed, _ = kill_phase(spec.name, spec.args(ws, out), 0.5 * duration / 4, overwrite=True)
        fault = Fault(spec.name, "overwrite", killed)
        fault.checks["old run intact"] = snapshot(out, exclude=out / ".overwrite-staging") == before
        fault.checks["earlier intact"] = earlier_intact()
        faults.append(fault)
        log(f"  {spec.name:<16} overwrite killed at {killed:5.1f} s  "
            f"{'ok' if fault.survived else 'FAILED ' + str(fault.checks)}")  # fmt: skip
    return faults


def fault_check(workspace: Path, kills: int = 3, seed: int = 0,
                log: Callable[[str], None] = print) -> list[Fault]:  # fmt: skip
    """Every long phase of the demo, in order, each killed ``kills`` times, in ``workspace``
    (replaced on every run: only a new or empty folder, or one an earlier run made)."""
    if kills < 1:
        raise UserError(f"--kills must be >= 1, got {kills}")
    check_writable_folder(workspace, "choose another --workspace")
    ours = {spec.output.split("/")[0] for spec in PHASES} | {"reference", "probe"}
    if any(p.name not in ours for p in workspace.iterdir()):  # a run made it: it may go
        raise UserError(
            f"{workspace}: holds files fault_check did not write, and a run replaces its "
            "workspace; choose a new or empty --workspace"
        )
    rng = random.Random(seed)
    shutil.rmtree(workspace, ignore_errors=True)
    workspace.mkdir(parents=True)
    faults: list[Fault] = []
    for spec in PHASES:
        log(f"{spec.name}:")
        faults += check_phase(spec, workspace, kills, rng, log)
        if not (workspace / spec.output).exists() or spec.training:
            code, text, _ = run_subprocess(spec.name, spec.args(workspace, workspace / spec.output))
            if code != 0:
                raise RuntimeError(f"{spec.name} failed after the faults:\n{text}")
    return faults


def fault_table(faults: list[Fault]) -> str:
    lines = [f"{'phase':<16} {'mode':<9} {'killed at':>9}  checks", "-" * 72]
    for f in faults:
        checks = ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in f.checks.items())
        lines.append(f"{f.phase:<16} {f.mode:<9} {f.killed_at:8.1f}s  {checks}")
    survived = sum(f.survived for f in faults)
    lines.append(f"\n{len(faults)} faults injected, {survived} survived")
    return "\n".join(lines)
