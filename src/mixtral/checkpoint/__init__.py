"""Checkpoint formats: the Hub layout (safetensors, sharded), Mistral's consolidated format."""

from .source import CheckpointError

__all__ = ["CheckpointError"]
