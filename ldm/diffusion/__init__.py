"""Diffusion: noise schedules and training targets, samplers, the latent-diffusion wrapper."""
