from .mixtral import (MixtralForCausalLM, MixtralForQuestionAnswering, MixtralForSequenceClassification,
                      MixtralForTokenClassification, MixtralModel)
from .base import MixtralPreTrainedModel

__all__ = ["MixtralModel", "MixtralForCausalLM", "MixtralForSequenceClassification", "MixtralForTokenClassification",
           "MixtralForQuestionAnswering", "MixtralPreTrainedModel"]
