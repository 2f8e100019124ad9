"""ttaserve: an online test-time adaptation inference server."""

__version__ = "0.1.0"
