"""expertmix: an open ecosystem of mixtures of experts."""

__version__ = "0.1.0"
