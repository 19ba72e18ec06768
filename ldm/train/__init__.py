"""The one training loop, its optimiser/EMA/precision settings and the run folder."""
