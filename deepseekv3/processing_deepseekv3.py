"""Processor of the DeepSeek-V3 multimodal model: text, images and audio in, the model's inputs out.

`DeepseekV3MultimodalProcessor` composes a tokenizer, transformers' SigLIP image processor (resize to the model's
square `image_size`, rescale, normalise) and transformers' Whisper feature extractor (log-mel frames). It rides the
`ProcessorMixin` pipeline: `validate_inputs` checks that each `<image>` / `<audio>` placeholder has its media,
`replace_image_token` / `replace_audio_token` expand each placeholder into exactly as many placeholder tokens as the
model produces for that image or clip, and `apply_chat_template` renders conversations. On top of the pipeline it
loads and checks media (`media_deepseekv3.py`: clear `ValueError`s for corrupt, empty, oversized or non-finite input),
truncates without ever cutting through a media span, pads left or right, and returns `mm_token_type_ids`
(`layout_deepseekv3.py`). The class wires these together; the work itself is done by those modules' functions.

This file is part of the hub-portable core: it imports only the standard library, numpy, Pillow, torch and
transformers, and its sibling modules with single-dot imports (so `save_pretrained` copies them next to it).
"""

from typing import Any

import numpy as np
from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack

from .configuration_deepseekv3 import DeepseekV3MultimodalConfig
from .layout_deepseekv3 import (
    assistant_labels,
    check_layout_sizes,
    check_media_truncation,
    check_processor_matches_config,
    lay_out_rows,
    placeholder_token_ids,
)
from .media_deepseekv3 import build_media_processors, extract_audio_features, load_audio_clips, load_images

__all__ = ["DeepseekV3MultimodalProcessor", "DeepseekV3MultimodalProcessorKwargs"]

_MODEL_INPUT_NAMES = (
    "input_ids",
    "attention_mask",
    "mm_token_type_ids",
    "pixel_values",
    "input_features",
    "input_features_mask",
)
# The tokenizer options the processor applies itself, on whole media spans (`lay_out_rows`).
_LAYOUT_KWARGS = ("padding", "truncation", "max_length", "padding_side", "pad_to_multiple_of")


class DeepseekV3MultimodalProcessorKwargs(ProcessingKwargs, total=False):
    """Call-time options on top of the sub-processors' own.

    Attributes:
        media_truncation (`str`, defaults to `"error"`): what `truncation=True` does when `max_length` would remove
            media tokens: `"error"` raises, `"drop"` removes every image or clip that does not fit whole (its tokens
            and its `pixel_values` / `input_features` row). Text alone is always truncated.
        resample_audio (`bool`, defaults to `False`): resample audio given at another `sampling_rate` to the feature
            extractor's rate instead of raising.
    """

    media_truncation: str
    resample_audio: bool


class DeepseekV3MultimodalProcessor(ProcessorMixin):
    r"""
    Turns text with `<image>` / `<audio>` placeholders, images and audio into the inputs of
    [`DeepseekV3MultimodalForConditionalGeneration`].

    Each `<image>` in the text becomes `(image_size // patch_size) ** 2` image tokens, each `<audio>` becomes
    `num_frames // audio_conv_stride` audio tokens; images and clips are matched to placeholders in order of
    appearance, row by row through the batch.

    The images and audio it accepts, and how it converts them, are those of `load_images` and `load_audio_clips`
    (`media_deepseekv3.py`); anything else raises a `ValueError` naming the image or clip and the problem.

    Args:
        image_processor ([`SiglipImageProcessorPil`]): square resize to `image_size`, rescale, normalise.
        feature_extractor ([`WhisperFeatureExtractor`]): log-mel features with `num_mel_bins` bins.
        tokenizer ([`PreTrainedTokenizerFast`]): must know the `image_token` and `audio_token` strings.
        chat_template (`str`, *optional*): Jinja chat template; defaults to the tokenizer's.
        patch_size (`int`, *optional*, defaults to 16): the model's `patch_size`; must divide the image size.
        audio_conv_stride (`int`, *optional*, defaults to 4): the model's `audio_conv_stride`.
        audio_max_frames (`int`, *optional*, defaults to 3000): the model's `audio_max_frames`; longer clips raise.
        max_image_pixels (`int`, *optional*, defaults to 67_108_864): largest accepted `width * height`.
        image_token (`str`, *optional*, defaults to `"<image>"`): the image placeholder.
        audio_token (`str`, *optional*, defaults to `"<audio>"`): the audio placeholder.

    Example:

    ```python
    >>> from deepseekv3 import DeepseekV3MultimodalProcessor
    >>> from deepseekv3.tokenization import load_default_tokenizer

    >>> processor = DeepseekV3MultimodalProcessor.from_config(config, load_default_tokenizer())
    >>> inputs = processor(text=["<image> What is this?"], images=[image], return_tensors="pt")
    ```"""

    valid_processor_kwargs = DeepseekV3MultimodalProcessorKwargs
    # Lowest-priority call defaults (ProcessorMixin reads these class attributes).
    media_truncation = "error"
    resample_audio = False

    def __init__(
        self,
        image_processor=None,
        feature_extractor=None,
        tokenizer=None,
        chat_template: str | None = None,
        patch_size: int = 16,
        audio_conv_stride: int = 4,
        audio_max_frames: int = 3000,
        max_image_pixels: int = 8192 * 8192,
        image_token: str = "<image>",
        audio_token: str = "<audio>",
    ):
        self.patch_size = patch_size
        self.audio_conv_stride = audio_conv_stride
        self.audio_max_frames = audio_max_frames
        self.max_image_pixels = max_image_pixels
        self.image_token = image_token
        self.audio_token = audio_token
        self.image_token_id, self.audio_token_id = placeholder_token_ids(tokenizer, image_token, audio_token)
        super().__init__(
            image_processor, feature_extractor, tokenizer, chat_template=chat_template or tokenizer.chat_template
        )
        check_layout_sizes(self.image_processor.size, patch_size, audio_conv_stride, audio_max_frames)

    @classmethod
    def from_config(
        cls, config: DeepseekV3MultimodalConfig, tokenizer, **kwargs: Any
    ) -> "DeepseekV3MultimodalProcessor":
        """Build the processor that feeds a model of configuration `config`.

        Args:
            config (`DeepseekV3MultimodalConfig`): the model's configuration (image, patch, mel and stride sizes).
            tokenizer (`PreTrainedTokenizerFast`): a tokenizer whose vocabulary fits `config.vocab_size` and whose
                special-token ids are the config's.
            **kwargs: further `__init__` arguments (`max_image_pixels`, `chat_template`, ...).

        Returns:
            `DeepseekV3MultimodalProcessor`
        """
        image_processor, feature_extractor = build_media_processors(config)
        processor = cls(
            image_processor,
            feature_extractor,
            tokenizer,
            patch_size=config.patch_size,
            audio_conv_stride=config.audio_conv_stride,
            audio_max_frames=config.audio_max_frames,
            **kwargs,
        )
        processor.check_matches_config(config)
        return processor

    def check_matches_config(self, config: DeepseekV3MultimodalConfig) -> None:
        """Raise `ValueError` if this processor would produce inputs the model of `config` cannot read.

        Checks the vocabulary size (an id `>= vocab_size` would fail deep inside the embedding), the special-token
        ids, and every size the placeholder counts depend on.

        Args:
            config (`DeepseekV3MultimodalConfig`): the model's configuration.
        """
        check_processor_matches_config(self, config)

    @property
    def image_size(self) -> int:
        """Side, in pixels, of the square images the processor produces."""
        return self.image_processor.size["height"]

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image: `(image_size // patch_size) ** 2`."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def model_input_names(self) -> list[str]:
        return list(_MODEL_INPUT_NAMES)

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        audio=None,
        **kwargs: Unpack[DeepseekV3MultimodalProcessorKwargs],
    ) -> BatchFeature:
        """Tokenize `text`, expand its placeholders, and process `images` and `audio`.

        Args:
            images (*optional*): one image, a flat list, or one list per text (see the class docstring for types).
            text (`str` or `list[str]`, *optional*): the prompts; each `<image>` / `<audio>` takes the next image /
                clip.
            audio (*optional*): one clip or a flat list of clips, in order of appearance through the batch.
            **kwargs: tokenizer options (`padding`, `padding_side`, `truncation`, `max_length`, `pad_to_multiple_of`,
                `add_special_tokens`, `return_tensors`), image-processor and feature-extractor options
                (`sampling_rate`), `media_truncation` and `resample_audio`.

        Returns:
            [`BatchFeature`]: `input_ids`, `attention_mask`, `mm_token_type_ids` (0 text, 1 image, 2 audio) of shape
            `(batch, seq_len)`; with images `pixel_values` `(num_images, 3, image_size, image_size)`; with audio
            `input_features` `(num_clips, num_mel_bins, frames)` and `input_features_mask` `(num_clips, frames)`.
            `mm_token_type_ids` uses the config's modality ids (always returned; `return_mm_token_type_ids` and
            `ProcessorMixin.create_mm_token_type_ids`, which numbers audio 3, are not used).
        """
        if text is not None:
            text = [text] if isinstance(text, str) else list(text)
        images = load_images(images, self.max_image_pixels) if images is not None else None
        merged_kwargs = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        audio_kwargs = merged_kwargs["audio_kwargs"]
        if audio is not None:
            audio = self._load_audio(
                audio, audio_kwargs.pop("sampling_rate", None), bool(merged_kwargs["resample_audio"])
            )
        self.validate_inputs(images=images, text=text, audio=audio)
        check_media_truncation(merged_kwargs["media_truncation"])

        text_kwargs = merged_kwargs["text_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        layout_kwargs = {key: text_kwargs.pop(key, None) for key in _LAYOUT_KWARGS}
        return_text_replacement_offsets = text_kwargs.pop(
            "return_text_replacement_offsets", merged_kwargs["return_text_replacement_offsets"]
        )
        text_kwargs.pop("return_mm_token_type_ids", None)

        processed_images, image_replacements = {}, []
        if images:
            processed_images, image_replacements = self._process_images(images, **merged_kwargs["images_kwargs"])
        processed_audio, audio_replacements = {}, []
        if audio:
            processed_audio, audio_replacements = self._process_audio(audio)
        media = {**processed_images, **processed_audio}
        if text is None:
            return BatchFeature(media, tensor_type=return_tensors)

        text, text_replacement_offsets = self.get_text_with_replacements(
            text, images_replacements=image_replacements, audio_replacements=audio_replacements
        )
        # Padding and truncation happen below, on whole media spans; the tokenizer must not cut or pad.
        encoding = self.tokenizer(text, padding=False, truncation=False, **text_kwargs)
        rows = {
            key: list(encoding[key]) for key in ("input_ids", "attention_mask", "offset_mapping") if key in encoding
        }
        rows, media = lay_out_rows(
            rows,
            media,
            self.image_token_id,
            self.audio_token_id,
            self.num_image_tokens,
            self.audio_conv_stride,
            self.tokenizer.pad_token_id,
            layout_kwargs.pop("padding_side") or self.tokenizer.padding_side,
            self.tokenizer.truncation_side,
            merged_kwargs["media_truncation"],
            return_tensors=return_tensors,
            **layout_kwargs,
        )
        if return_text_replacement_offsets:
            rows["text_replacement_offsets"] = text_replacement_offsets
        return BatchFeature(
            {**rows, **media}, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion
        )

    def build_assistant_labels(self, input_ids, assistant_masks):
        """Labels for "train on assistant turns only": `input_ids` where `assistant_masks` is 1, -100 elsewhere.

        `assistant_masks` comes from `apply_chat_template(..., return_assistant_tokens_mask=True, return_dict=True)`,
        which marks each assistant reply and its closing `<|end|>`; prompts, media placeholders and padding get -100.

        Args:
            input_ids (`torch.Tensor` or `list[list[int]]`): `(batch, seq_len)`.
            assistant_masks (`torch.Tensor` or `list[list[int]]`): `(batch, seq_len)`, 1 on assistant tokens.

        Returns:
            `torch.Tensor`: `(batch, seq_len)` long labels.
        """
        return assistant_labels(input_ids, assistant_masks)

    # ----------------------------------------------------------------------------------------------------------------
    # Pipeline hooks

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    def replace_audio_token(self, audio_inputs: dict, audio_idx: int, **kwargs) -> str:
        num_frames = int(audio_inputs["input_features_mask"][audio_idx].sum())
        return self.audio_token * (num_frames // self.audio_conv_stride)

    def _process_images(self, images: list[Image.Image], **kwargs):
        kwargs["return_tensors"] = "np"
        return super()._process_images(images, **kwargs)

    def _process_audio(self, audio: list[np.ndarray], **kwargs):
        """Log-mel features of every clip, padded to the longest, with the frame mask the model reads."""
        processed_audio = extract_audio_features(self.feature_extractor, audio)
        replacements = [self.replace_audio_token(processed_audio, audio_idx=idx) for idx in range(len(audio))]
        return processed_audio, replacements

    def _load_audio(self, audio, sampling_rate: int | None, resample_audio: bool) -> list[np.ndarray]:
        """Checked mono float32 clips at the feature extractor's rate (see `load_audio_clips`)."""
        return load_audio_clips(
            audio,
            target_rate=self.feature_extractor.sampling_rate,
            hop_length=self.feature_extractor.hop_length,
            audio_conv_stride=self.audio_conv_stride,
            audio_max_frames=self.audio_max_frames,
            sampling_rate=sampling_rate,
            resample_audio=resample_audio,
        )
