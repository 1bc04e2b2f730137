"""safesteer: inference-time safety alignment for frozen language models."""

__version__ = "0.1.0"
