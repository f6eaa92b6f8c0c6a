"""mailproc: authenticated support mail in, agent-approved account resets out."""

__version__ = "0.1.0"
