"""crosschip: a safe checkpoint hand-off between training and serving accelerators."""

__version__ = "0.1.0"
