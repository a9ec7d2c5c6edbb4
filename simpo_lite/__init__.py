"""simpo-lite: SimPO preference tuning of a 4-bit LoRA model on one consumer GPU."""

__version__ = "0.1.0"
