"""Developer tools: the fake iVvy (``fake_ivvy``, a real HTTP server) and the demo built on it (``demo``).

Each is a package split by job; its ``__init__`` names what other code uses (``__all__``).
Nothing in ``worker.core``, the worker or the producers imports them.
"""
