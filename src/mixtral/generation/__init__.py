"""Text generation: sampling filters, generate(), streamers."""

from .config import GenerationConfig
from .generate import generate
from .streamers import TextIteratorStreamer, TextStreamer

__all__ = ["GenerationConfig", "generate", "TextStreamer", "TextIteratorStreamer"]
