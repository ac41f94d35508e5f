"""deepseekv3: a DeepSeek-V3-style multimodal model (text, images, audio) for Hugging Face Transformers.

Importing the package registers the config, models and processor with the Auto classes and marks each class for
auto-class saving, so `save_pretrained` / `push_to_hub` write `auto_map` and copy the code files next to the weights.
"""

from importlib.util import find_spec

from ._quiet_import import quiet_torchao_import

# the first import of a transformers model class imports torchao where it is installed (see `_quiet_import`)
with quiet_torchao_import():
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForMultimodalLM,
        AutoProcessor,
    )

    from .configuration_deepseekv3 import DeepseekV3MultimodalConfig
    from .modeling_deepseekv3 import (
        DeepseekV3MultimodalCausalLMOutputWithPast,
        DeepseekV3MultimodalForConditionalGeneration,
        DeepseekV3MultimodalModel,
        DeepseekV3MultimodalModelOutputWithPast,
        DeepseekV3MultimodalPreTrainedModel,
    )
    from .processing_deepseekv3 import DeepseekV3MultimodalProcessor

__all__ = [
    "DeepseekV3MultimodalConfig",
    "DeepseekV3MultimodalPreTrainedModel",
    "DeepseekV3MultimodalModel",
    "DeepseekV3MultimodalForConditionalGeneration",
    "DeepseekV3MultimodalModelOutputWithPast",
    "DeepseekV3MultimodalCausalLMOutputWithPast",
    "DeepseekV3MultimodalProcessor",
]

AutoConfig.register(DeepseekV3MultimodalConfig.model_type, DeepseekV3MultimodalConfig, exist_ok=True)
AutoModel.register(DeepseekV3MultimodalConfig, DeepseekV3MultimodalModel, exist_ok=True)
AutoModelForCausalLM.register(DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(
    DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration, exist_ok=True
)
AutoModelForMultimodalLM.register(
    DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration, exist_ok=True
)
AutoProcessor.register(DeepseekV3MultimodalConfig, DeepseekV3MultimodalProcessor, exist_ok=True)
DeepseekV3MultimodalConfig.register_for_auto_class("AutoConfig")
DeepseekV3MultimodalModel.register_for_auto_class("AutoModel")
DeepseekV3MultimodalForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")
DeepseekV3MultimodalProcessor.register_for_auto_class("AutoProcessor")

if (
    find_spec("peft") is not None
):  # the optional `train` extra: `LoraConfig()` without target_modules finds our defaults
    from .training.lora import register_lora_target_modules

    register_lora_target_modules()
