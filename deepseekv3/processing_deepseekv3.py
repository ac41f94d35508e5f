"""Processor of the DeepSeek-V3 multimodal model: text, images and audio in, the model's inputs out.

`DeepseekV3MultimodalProcessor` composes a tokenizer, transformers' SigLIP image processor (resize to the model's
square `image_size`, rescale, normalise) and transformers' Whisper feature extractor (log-mel frames). It rides the
`ProcessorMixin` pipeline: `validate_inputs` checks that each `<image>` / `<audio>` placeholder has its media,
`replace_image_token` / `replace_audio_token` expand each placeholder into exactly as many placeholder tokens as the
model produces for that image or clip, and `apply_chat_template` renders conversations. On top of the pipeline it
loads and checks media (clear `ValueError`s for corrupt, empty, oversized or non-finite input), truncates without
ever cutting through a media span, pads left or right, and returns `mm_token_type_ids`.

This file is part of the hub-portable core: it imports only the standard library, numpy, Pillow, torch and
transformers, and the configuration with a single-dot import.
"""

import io
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, SiglipImageProcessorPil, WhisperFeatureExtractor
from transformers.audio_utils import load_audio
from transformers.image_utils import load_image
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack

from .configuration_deepseekv3 import (
    AUDIO_MODALITY_ID,
    IMAGE_MODALITY_ID,
    TEXT_MODALITY_ID,
    DeepseekV3MultimodalConfig,
)

__all__ = ["DeepseekV3MultimodalProcessor", "DeepseekV3MultimodalProcessorKwargs"]

_MEDIA_TRUNCATION_CHOICES = ("error", "drop")
# Modes whose pixels carry transparency: composited onto white rather than having their alpha thrown away.
_MODES_WITH_ALPHA = ("RGBA", "LA", "PA", "La", "RGBa")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


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

    Inputs it accepts and converts (documented conversions, everything else raises `ValueError` naming the problem):

    - images: PIL images, file paths, `http(s)` URLs, encoded bytes, `(H, W)`, `(H, W, C)` or `(C, H, W)` arrays or
      tensors (`uint8`, or floats in `[0, 1]`). Grayscale and palette images are converted to RGB; images with an
      alpha channel are composited onto white; 16-bit images are scaled to 8 bits. Images with more than
      `max_image_pixels` pixels are refused before they are decoded.
    - audio: one clip as a 1-D array / tensor / list of floats, or a list of clips; integer PCM is scaled to
      `[-1, 1]`. A 2-D clip is multi-channel audio, its shorter axis the channels: the channels are averaged to mono.
      A clip sampled at another `sampling_rate` raises unless `resample_audio=True`. Each clip is zero-padded to a
      whole number of hops, so its token count does not depend on the other clips of the batch.

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
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.audio_token_id = tokenizer.convert_tokens_to_ids(audio_token)
        for name, token, token_id in (
            ("image_token", image_token, self.image_token_id),
            ("audio_token", audio_token, self.audio_token_id),
        ):
            if token_id is None or token_id == tokenizer.unk_token_id or token not in tokenizer.get_vocab():
                raise ValueError(f"{name} ({token!r}) is not a token of the tokenizer")
        super().__init__(
            image_processor, feature_extractor, tokenizer, chat_template=chat_template or tokenizer.chat_template
        )
        image_size = self.image_size
        if self.image_processor.size.get("width", image_size) != image_size:
            raise ValueError(f"the image processor's size ({self.image_processor.size}) must be square")
        if image_size % patch_size != 0:
            raise ValueError(f"patch_size ({patch_size}) must divide image_size ({image_size})")
        if audio_max_frames % audio_conv_stride != 0:
            raise ValueError(
                f"audio_conv_stride ({audio_conv_stride}) must divide audio_max_frames ({audio_max_frames})"
            )

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
        if config.num_channels != 3:
            raise ValueError(f"num_channels ({config.num_channels}) must be 3: the processor produces RGB images")
        image_processor = SiglipImageProcessorPil(size={"height": config.image_size, "width": config.image_size})
        # `chunk_length` (whole seconds) only sets the extractor's default padding; the processor pads to the longest
        # clip. Whisper's defaults: 16 kHz, a hop of 160 samples per frame.
        chunk_length = max(1, math.ceil(config.audio_max_frames * 160 / 16000))
        feature_extractor = WhisperFeatureExtractor(
            feature_size=config.num_mel_bins, chunk_length=chunk_length, return_attention_mask=True
        )
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
        if len(self.tokenizer) > config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is {config.vocab_size}: "
                f"ids >= {config.vocab_size} have no embedding; build the config with vocab_size >= "
                f"{len(self.tokenizer)}"
            )
        pairs = {
            "pad_token_id": (self.tokenizer.pad_token_id, config.pad_token_id),
            "bos_token_id": (self.tokenizer.bos_token_id, config.bos_token_id),
            "eos_token_id": (self.tokenizer.eos_token_id, config.eos_token_id),
            "image_token_id": (self.image_token_id, config.image_token_id),
            "audio_token_id": (self.audio_token_id, config.audio_token_id),
            "image_size": (self.image_size, config.image_size),
            "patch_size": (self.patch_size, config.patch_size),
            "num_mel_bins": (self.feature_extractor.feature_size, config.num_mel_bins),
            "audio_conv_stride": (self.audio_conv_stride, config.audio_conv_stride),
            "audio_max_frames": (self.audio_max_frames, config.audio_max_frames),
        }
        for name, (processor_value, config_value) in pairs.items():
            if config_value is not None and processor_value != config_value:
                raise ValueError(f"config.{name} ({config_value}) differs from the processor's ({processor_value})")

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
        return [
            "input_ids",
            "attention_mask",
            "mm_token_type_ids",
            "pixel_values",
            "input_features",
            "input_features_mask",
        ]

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
        images = self._load_images(images) if images is not None else None
        merged_kwargs = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        audio_kwargs = merged_kwargs["audio_kwargs"]
        if audio is not None:
            audio = self._load_audio(
                audio, audio_kwargs.pop("sampling_rate", None), bool(merged_kwargs["resample_audio"])
            )
        self.validate_inputs(images=images, text=text, audio=audio)
        media_truncation = merged_kwargs["media_truncation"]
        if media_truncation not in _MEDIA_TRUNCATION_CHOICES:
            raise ValueError(f"media_truncation ({media_truncation!r}) must be one of {_MEDIA_TRUNCATION_CHOICES}")

        text_kwargs = merged_kwargs["text_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        layout_kwargs = {
            key: text_kwargs.pop(key, None)
            for key in ("padding", "truncation", "max_length", "padding_side", "pad_to_multiple_of")
        }
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
        rows, media = self._truncate(rows, media, media_truncation, **layout_kwargs)
        rows["mm_token_type_ids"] = [self._modality_ids(ids) for ids in rows["input_ids"]]
        rows = self._pad(rows, return_tensors=return_tensors, **layout_kwargs)
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
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        assistant_masks = torch.as_tensor(assistant_masks)
        if input_ids.shape != assistant_masks.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and assistant_masks {tuple(assistant_masks.shape)} must match"
            )
        return input_ids.masked_fill(assistant_masks == 0, -100)

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
        features = self.feature_extractor(
            audio,
            sampling_rate=self.feature_extractor.sampling_rate,
            padding="longest",
            truncation=False,
            return_attention_mask=True,
            return_tensors="np",
        )
        processed_audio = {
            "input_features": features["input_features"].astype(np.float32),
            "input_features_mask": features["attention_mask"].astype(np.int64),
        }
        replacements = [self.replace_audio_token(processed_audio, audio_idx=idx) for idx in range(len(audio))]
        return processed_audio, replacements

    # ----------------------------------------------------------------------------------------------------------------
    # Loading and checking media

    def _load_images(self, images) -> list[Image.Image]:
        """Flatten `images` (one, a list, or a list per sample) into a list of RGB PIL images, checking each."""
        if _is_single_image(images):
            images = [images]
        flat = []
        for item in images:
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        return [self._load_image(image, index) for index, image in enumerate(flat)]

    def _load_image(self, image, index: int) -> Image.Image:
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            if path.startswith(("http://", "https://")):
                image = load_image(path)
            elif not os.path.isfile(path):
                raise ValueError(f"image {index}: the file {path!r} does not exist")
            else:
                image = self._open_image(path, index)
        elif isinstance(image, (bytes, bytearray)):
            image = self._open_image(io.BytesIO(image), index)
        elif isinstance(image, Image.Image):
            self._check_image_size(image.width, image.height, index)
        elif hasattr(image, "shape"):
            image = self._image_from_array(np.asarray(image), index)
        else:
            raise ValueError(
                f"image {index}: expected a PIL image, a path, bytes or an array, got {type(image).__name__}"
            )
        return _to_rgb(image)

    def _open_image(self, source, index: int) -> Image.Image:
        try:
            # Image.open reads only the header; the pixel limit is checked before any pixel is decoded.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(source)
            self._check_image_size(image.width, image.height, index)
            image.load()
        except Image.DecompressionBombError as error:
            raise ValueError(f"image {index}: refused as a decompression bomb ({error})") from error
        except (Image.UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(
                f"image {index}: cannot decode the image data, corrupt or not an image ({error})"
            ) from error
        return image

    def _check_image_size(self, width: int, height: int, index: int) -> None:
        if width == 0 or height == 0:
            raise ValueError(f"image {index}: zero-size image ({width}x{height})")
        if width * height > self.max_image_pixels:
            raise ValueError(
                f"image {index}: {width}x{height} = {width * height} pixels exceeds max_image_pixels "
                f"({self.max_image_pixels}); refused as a possible decompression bomb"
            )

    def _image_from_array(self, array: np.ndarray, index: int) -> Image.Image:
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(
                f"image {index}: expected an array of shape (H, W), (H, W, C) or (C, H, W), got {array.shape}"
            )
        self._check_image_size(array.shape[1], array.shape[0], index)
        if np.issubdtype(array.dtype, np.floating) or array.dtype == np.bool_:
            array = array.astype(np.float32)
            if not np.isfinite(array).all():
                raise ValueError(f"image {index}: the array contains NaN or infinite values")
            if array.min() < 0.0 or array.max() > 1.0:
                raise ValueError(f"image {index}: float pixels must lie in [0, 1], got [{array.min()}, {array.max()}]")
            array = np.round(array * 255.0).astype(np.uint8)
        elif array.dtype == np.uint16:
            array = (array // 257).astype(np.uint8)
        elif array.dtype != np.uint8:
            raise ValueError(f"image {index}: unsupported pixel dtype {array.dtype} (use uint8, uint16 or float)")
        return Image.fromarray(array)

    def _load_audio(self, audio, sampling_rate: int | None, resample_audio: bool) -> list[np.ndarray]:
        """Turn `audio` (one clip or a list of clips) into checked mono float32 clips at the extractor's rate."""
        target_rate = self.feature_extractor.sampling_rate
        clips = list(audio) if isinstance(audio, (list, tuple)) and not _is_number_list(audio) else [audio]
        if sampling_rate is not None and sampling_rate != target_rate and not resample_audio:
            raise ValueError(
                f"audio sampled at {sampling_rate} Hz but the feature extractor expects {target_rate} Hz; resample it "
                "or pass resample_audio=True"
            )
        hop_length = self.feature_extractor.hop_length
        loaded = []
        for index, clip in enumerate(clips):
            if isinstance(clip, (str, os.PathLike)):
                path = os.fspath(clip)
                if not path.startswith(("http://", "https://")) and not os.path.isfile(path):
                    raise ValueError(f"audio {index}: the file {path!r} does not exist")
                waveform = np.asarray(load_audio(path, sampling_rate=target_rate), dtype=np.float32)
            else:
                waveform = _to_mono_float(clip, index)
                if sampling_rate is not None and sampling_rate != target_rate:
                    waveform = _resample(waveform, sampling_rate, target_rate)
            min_samples = self.audio_conv_stride * hop_length
            max_samples = self.audio_max_frames * hop_length
            if waveform.shape[0] < min_samples:
                raise ValueError(
                    f"audio {index}: {waveform.shape[0]} samples is shorter than one audio token ({min_samples} "
                    f"samples = {min_samples / target_rate:.3f} s at {target_rate} Hz)"
                )
            if waveform.shape[0] > max_samples:
                raise ValueError(
                    f"audio {index}: {waveform.shape[0]} samples ({waveform.shape[0] / target_rate:.2f} s) exceeds "
                    f"audio_max_frames ({self.audio_max_frames} frames = {max_samples} samples); split the clip"
                )
            # Zero-pad to whole hops: every clip then gets exactly len / hop_length frames, however it is batched.
            loaded.append(np.pad(waveform, (0, -waveform.shape[0] % hop_length)))
        return loaded

    # ----------------------------------------------------------------------------------------------------------------
    # Token layout: media spans, truncation, padding, modality ids

    def _media_spans(self, input_ids: list[int]) -> list[tuple[int, int, str]]:
        """`(start, end, kind)` of every image / audio span in `input_ids`, in order ("image" or "audio")."""
        spans = []
        position = 0
        while position < len(input_ids):
            token_id = input_ids[position]
            if token_id not in (self.image_token_id, self.audio_token_id):
                position += 1
                continue
            end = position
            while end < len(input_ids) and input_ids[end] == token_id:
                end += 1
            if token_id == self.image_token_id:
                # Adjacent images form one run; each image owns num_image_tokens of it.
                spans.extend(
                    (start, start + self.num_image_tokens, "image")
                    for start in range(position, end, self.num_image_tokens)
                )
            else:
                spans.append((position, end, "audio"))
            position = end
        return spans

    def _split_audio_runs(self, spans, clip_lengths: list[int]) -> list[tuple[int, int, str]]:
        """Split runs of adjacent clips into one span per clip, using the clips' token counts in order."""
        result = []
        clip_iter = iter(clip_lengths)
        for start, end, kind in spans:
            if kind == "image":
                result.append((start, end, kind))
                continue
            while start < end:
                length = next(clip_iter)
                result.append((start, start + length, kind))
                start += length
        return result

    def _truncate(self, rows: dict, media: dict, media_truncation: str, truncation=None, max_length=None, **_):
        """Cut every row to `max_length` tokens without cutting a media span; drop or refuse media that do not fit."""
        if truncation in (None, False, "do_not_truncate") or max_length is None:
            return rows, media
        if truncation not in (True, "longest_first", "only_first"):
            raise ValueError(f"truncation ({truncation!r}) must be True, False, 'longest_first' or 'only_first'")
        clip_tokens = [
            int(frames) // self.audio_conv_stride
            for frames in media.get("input_features_mask", np.zeros((0, 1))).sum(-1)
        ]
        keep_side = self.tokenizer.truncation_side
        kept_images, kept_clips = [], []
        image_index = clip_index = 0
        for row_index, input_ids in enumerate(rows["input_ids"]):
            spans = self._split_audio_runs(self._media_spans(input_ids), clip_tokens[clip_index:])
            length = len(input_ids)
            start, stop = (
                (0, min(length, max_length)) if keep_side == "right" else (max(0, length - max_length), length)
            )
            for span_start, span_end, kind in spans:
                fits = start <= span_start and span_end <= stop
                cut = span_start < stop < span_end if keep_side == "right" else span_start < start < span_end
                if not fits and media_truncation == "error":
                    raise ValueError(
                        f"truncation to max_length ({max_length}) would remove {'part of ' if cut else ''}the {kind} "
                        f"at tokens [{span_start}, {span_end}) of sample {row_index} ({length} tokens); raise "
                        "max_length or pass media_truncation='drop'"
                    )
                if cut and keep_side == "right":
                    stop = span_start
                elif cut:
                    start = span_end
            for span_start, span_end, kind in spans:
                fits = start <= span_start and span_end <= stop
                if kind == "image":
                    if fits:
                        kept_images.append(image_index)
                    image_index += 1
                else:
                    if fits:
                        kept_clips.append(clip_index)
                    clip_index += 1
            for key in rows:
                rows[key][row_index] = rows[key][row_index][start:stop]
        media = dict(media)
        if "pixel_values" in media:
            media["pixel_values"] = media["pixel_values"][kept_images]
            if not kept_images:
                del media["pixel_values"]
        if "input_features" in media:
            if kept_clips:
                mask = media["input_features_mask"][kept_clips]
                frames = int(mask.sum(-1).max())
                media["input_features"] = media["input_features"][kept_clips, :, :frames]
                media["input_features_mask"] = mask[:, :frames]
            else:
                del media["input_features"], media["input_features_mask"]
        return rows, media

    def _modality_ids(self, input_ids: list[int]) -> list[int]:
        by_token = {self.image_token_id: IMAGE_MODALITY_ID, self.audio_token_id: AUDIO_MODALITY_ID}
        return [by_token.get(token_id, TEXT_MODALITY_ID) for token_id in input_ids]

    def _pad(
        self,
        rows: dict,
        return_tensors=None,
        padding=None,
        padding_side=None,
        pad_to_multiple_of=None,
        max_length=None,
        **_,
    ) -> dict:
        """Pad every row on `padding_side` (default: the tokenizer's) to the longest row or to `max_length`."""
        lengths = [len(ids) for ids in rows["input_ids"]]
        if padding in (None, False, "do_not_pad"):
            if return_tensors is not None and len(set(lengths)) > 1:
                raise ValueError(
                    f"the samples have different lengths ({lengths}); pass padding=True to return tensors"
                )
            return rows
        if padding in (True, "longest"):
            target = max(lengths)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max(max_length, max(lengths))
        else:
            raise ValueError(f"padding ({padding!r}) must be True, False, 'longest', 'max_length' or 'do_not_pad'")
        if pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        side = padding_side or self.tokenizer.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side ({side!r}) must be 'left' or 'right'")
        pad_values = {
            "input_ids": self.tokenizer.pad_token_id,
            "attention_mask": 0,
            "mm_token_type_ids": TEXT_MODALITY_ID,
            "offset_mapping": (0, 0),
        }
        padded = {}
        for key, values in rows.items():
            padded[key] = []
            for row in values:
                filler = [pad_values[key]] * (target - len(row))
                padded[key].append(filler + list(row) if side == "left" else list(row) + filler)
        return padded


def _is_single_image(images) -> bool:
    return isinstance(images, (Image.Image, str, os.PathLike, bytes, bytearray)) or hasattr(images, "shape")


def _is_number_list(values: Sequence) -> bool:
    return len(values) > 0 and all(isinstance(value, (int, float)) for value in values)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited onto white, 16-bit scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        array = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(array / 257.0), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _MODES_WITH_ALPHA:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_mono_float(clip, index: int) -> np.ndarray:
    """One clip as a finite mono float32 waveform; integer PCM scaled to [-1, 1], channels averaged."""
    if hasattr(clip, "detach"):
        clip = clip.detach().cpu().numpy()
    waveform = np.asarray(clip)
    if waveform.dtype.kind in "iu":
        waveform = waveform.astype(np.float64) / float(np.iinfo(waveform.dtype).max + 1)
    elif waveform.dtype.kind != "f":
        raise ValueError(f"audio {index}: expected numbers, got an array of dtype {waveform.dtype}")
    if waveform.ndim == 2:
        # Multi-channel: the shorter axis holds the channels; averaging them is the documented downmix to mono.
        waveform = waveform.mean(axis=int(np.argmin(waveform.shape)))
    if waveform.ndim != 1:
        raise ValueError(
            f"audio {index}: expected a 1-D (mono) or 2-D (channels) waveform, got shape {waveform.shape}"
        )
    if waveform.size == 0:
        raise ValueError(f"audio {index}: the clip is empty")
    if not np.isfinite(waveform).all():
        raise ValueError(f"audio {index}: the waveform contains NaN or infinite values")
    return waveform.astype(np.float32)


def _resample(waveform: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling by truncating or zero-extending the spectrum (treats the clip as periodic)."""
    num_out = max(1, round(waveform.shape[0] * target_rate / source_rate))
    spectrum = np.fft.rfft(waveform)
    resized = np.zeros(num_out // 2 + 1, dtype=spectrum.dtype)
    keep = min(resized.shape[0], spectrum.shape[0])
    resized[:keep] = spectrum[:keep]
    return (np.fft.irfft(resized, n=num_out) * (num_out / waveform.shape[0])).astype(np.float32)
