"""M2Rec as a Hugging Face transformers model.

Importing this package registers `M2RecConfig` and `M2RecForSequentialRecommendation` with `AutoConfig` and
`AutoModel`, the item vocabulary `M2RecItemTokenizer` with `AutoTokenizer`, and the "sequential-recommendation" task
with transformers' pipeline registry, so installed users load checkpoints without `trust_remote_code`. The same
files, copied next to a checkpoint by `save_pretrained`, are the remote code for everyone else.
"""

from transformers import AutoConfig, AutoModel, AutoTokenizer

from .configuration_m2rec import M2RecConfig
from .modeling_m2rec import (
    M2RecCache,
    M2RecForSequentialRecommendation,
    M2RecModel,
    M2RecModelOutput,
    M2RecPreTrainedModel,
    M2RecRecommendationOutput,
)
from .kernels import causal_conv1d, causal_conv1d_update, selective_scan, selective_state_update
from .pipeline_m2rec import SequentialRecommendationPipeline
from .tokenization_m2rec import M2RecItemTokenizer

AutoConfig.register(M2RecConfig.model_type, M2RecConfig, exist_ok=True)
AutoModel.register(M2RecConfig, M2RecForSequentialRecommendation, exist_ok=True)
AutoTokenizer.register(M2RecConfig, slow_tokenizer_class=M2RecItemTokenizer, exist_ok=True)

__all__ = [
    "M2RecCache",
    "M2RecConfig",
    "M2RecForSequentialRecommendation",
    "M2RecItemTokenizer",
    "M2RecModel",
    "M2RecModelOutput",
    "M2RecPreTrainedModel",
    "M2RecRecommendationOutput",
    "SequentialRecommendationPipeline",
    "causal_conv1d",
    "causal_conv1d_update",
    "selective_scan",
    "selective_state_update",
]
