"""openflamingo-hf: OpenFlamingo as a transformers model.

Importing this package registers the model with the Auto classes: `AutoConfig`, `AutoModelForImageTextToText`,
`AutoModelForVision2Seq` (transformers 4.x), `AutoModel` (the same class: there is no model without the LM's head, as
for Llama 4), `AutoImageProcessor` and `AutoProcessor` (and, on 4.x, `AutoTokenizer` for a folder without
`tokenizer_config.json`).
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from .configuration_openflamingo import OpenFlamingoConfig
from .data_collator import OpenFlamingoDataCollator, attention_mask_without_host_sync, causal_attention_mask_4d
from .image_processing_openflamingo import OpenFlamingoImageProcessor, open_image
from .modeling_openflamingo import (
    _TRANSFORMERS_MAJOR,
    OpenFlamingoCausalLMOutputWithPast,
    OpenFlamingoForConditionalGeneration,
    OpenFlamingoImageCache,
    OpenFlamingoPreTrainedModel,
    gets_weight_decay,
)
from .optimization import MixedPrecisionAdamW, autocast_linear_parameters
from .processing_openflamingo import OpenFlamingoProcessor

__version__ = "0.1.0"

AutoConfig.register("openflamingo", OpenFlamingoConfig, exist_ok=True)
AutoModelForImageTextToText.register(OpenFlamingoConfig, OpenFlamingoForConditionalGeneration, exist_ok=True)
AutoModel.register(OpenFlamingoConfig, OpenFlamingoForConditionalGeneration, exist_ok=True)
try:  # transformers 4.x only
    from transformers import AutoModelForVision2Seq, PreTrainedTokenizerFast

    AutoModelForVision2Seq.register(OpenFlamingoConfig, OpenFlamingoForConditionalGeneration, exist_ok=True)
    # a folder whose tokenizer_config.json is missing: its tokenizer.json, as 5.x reads it (4.x looked the config class
    # up in its own table and failed with a bare KeyError)
    AutoTokenizer.register(OpenFlamingoConfig, fast_tokenizer_class=PreTrainedTokenizerFast, exist_ok=True)
except ImportError:
    pass
AutoImageProcessor.register(OpenFlamingoConfig, slow_image_processor_class=OpenFlamingoImageProcessor, exist_ok=True)
AutoProcessor.register(OpenFlamingoConfig, OpenFlamingoProcessor, exist_ok=True)
if _TRANSFORMERS_MAJOR >= 5:
    # no video processor, known locally: 5.x's pipeline looks one up for every image-text model and, for a folder
    # saved by 4.x (whose preprocessor_config.json names the image processor in a top-level `auto_map`), read that as
    # remote code to run and asked "Do you wish to run the custom code? [y/N]"
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING

    VIDEO_PROCESSOR_MAPPING.register(OpenFlamingoConfig, {}, exist_ok=True)

# `save_pretrained` writes an `auto_map` and copies the code, so saved folders load with `trust_remote_code=True`.
OpenFlamingoConfig.register_for_auto_class()
OpenFlamingoForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
OpenFlamingoImageProcessor.register_for_auto_class("AutoImageProcessor")
OpenFlamingoProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "MixedPrecisionAdamW",
    "OpenFlamingoCausalLMOutputWithPast",
    "OpenFlamingoConfig",
    "OpenFlamingoDataCollator",
    "OpenFlamingoForConditionalGeneration",
    "OpenFlamingoImageCache",
    "OpenFlamingoImageProcessor",
    "OpenFlamingoPreTrainedModel",
    "OpenFlamingoProcessor",
    "attention_mask_without_host_sync",
    "autocast_linear_parameters",
    "causal_attention_mask_4d",
    "gets_weight_decay",
    "open_image",
]
