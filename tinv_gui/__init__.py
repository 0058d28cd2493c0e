"""tinv-gui: teach Stable Diffusion a new concept from a few pictures."""

__version__ = "0.1.0"
