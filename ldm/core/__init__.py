"""Infrastructure: config loading and checks, errors, atomic files, checkpoints, devices and
torchrun, the phase registry."""
