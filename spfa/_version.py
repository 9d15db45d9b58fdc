"""The version of spfa (read by setup.cfg and the file format)."""

__version__ = "0.1.0"
