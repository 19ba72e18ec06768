"""One module (or package) per phase, named like the phase; each holds its config and run.

Phases import only library code (``ldm.data``, ``ldm.nets``, ``ldm.diffusion.schedule``, ...), never
each other. ``ldm.core.registry`` lists them in order.
"""
