"""mbrec: multi-behavior recommendation with faithful models and explicit evaluation."""

__version__ = "0.1.0"
