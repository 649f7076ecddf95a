"""Z-Image-Turbo inference server with an OpenAI-compatible images API."""

__version__ = "0.1.0"
