"""mixtral: the Mixtral sparse mixture-of-experts model in PyTorch, with Transformers' API."""

from .auto import AutoConfig, AutoModel, AutoModelForCausalLM
from .cache import DynamicCache
from .config import MixtralConfig
from .generation import GenerationConfig, TextIteratorStreamer, TextStreamer
from .model import (MixtralForCausalLM, MixtralForQuestionAnswering, MixtralForSequenceClassification,
                    MixtralForTokenClassification, MixtralModel, MixtralPreTrainedModel)
from .model.losses import load_balancing_loss
from .pipeline import TextGenerationPipeline, pipeline
from .quantize import quantize
from .tokenizer import AutoTokenizer, MixtralTokenizer

__version__ = "0.1.0"

__all__ = ["MixtralConfig", "MixtralModel", "MixtralForCausalLM", "MixtralForSequenceClassification",
           "MixtralForTokenClassification", "MixtralForQuestionAnswering", "MixtralPreTrainedModel", "DynamicCache",
           "load_balancing_loss", "GenerationConfig", "TextStreamer", "TextIteratorStreamer", "pipeline",
           "TextGenerationPipeline", "MixtralTokenizer", "AutoTokenizer", "quantize",
           "AutoConfig", "AutoModel", "AutoModelForCausalLM"]
