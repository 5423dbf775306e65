"""modelpack: package a base model and a LoRA adapter into a verified, self-contained bundle."""

__version__ = "0.1.0"
