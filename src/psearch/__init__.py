"""psearch: joint detection and identification for person search."""

__version__ = "0.1.0"
