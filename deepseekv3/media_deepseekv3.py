"""Loading and checking the processor's media: images become RGB PIL images, audio becomes mono float32 clips.

`load_images` accepts PIL images, paths, URLs, encoded bytes and arrays; `load_audio_clips` accepts arrays, tensors,
lists of numbers and paths. Both raise a `ValueError` that names the image or clip (by its index) and what is wrong
with it: corrupt, empty, oversized, non-finite, or of the wrong sampling rate.

`build_media_processors` builds transformers' image processor and feature extractor for a model's config, and
`extract_audio_features` turns loaded clips into the log-mel features and frame mask the model reads.

Part of the hub-portable core: `processing_deepseekv3.py` imports it with a single dot, so `save_pretrained` copies it
next to the weights. It imports only the standard library, numpy, Pillow, transformers and the configuration.
"""

import io
import math
import os
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image
from transformers import SiglipImageProcessorPil, WhisperFeatureExtractor
from transformers.audio_utils import load_audio
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import load_image

from .configuration_deepseekv3 import DeepseekV3MultimodalConfig

__all__ = ["build_media_processors", "extract_audio_features", "load_audio_clips", "load_images"]

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def build_media_processors(
    config: DeepseekV3MultimodalConfig,
) -> tuple[SiglipImageProcessorPil, WhisperFeatureExtractor]:
    """transformers' SigLIP image processor (square resize to `image_size`, rescale, normalise) and Whisper feature
    extractor (`num_mel_bins` log-mel bins, with the frame mask) for a model of configuration `config`.

    Raises:
        `ValueError`: if `config.num_channels` is not 3 (the image processor produces RGB images).
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
    return image_processor, feature_extractor


def extract_audio_features(feature_extractor: WhisperFeatureExtractor, clips: list[np.ndarray]) -> dict:
    """Log-mel features of every clip (from `load_audio_clips`), padded to the longest, with the frame mask.

    Returns:
        `dict`: `input_features` float32 `(num_clips, num_mel_bins, frames)` and `input_features_mask` int64
        `(num_clips, frames)`, 1 for real frames.
    """
    features = feature_extractor(
        clips,
        sampling_rate=feature_extractor.sampling_rate,
        padding="longest",
        truncation=False,
        return_attention_mask=True,
        return_tensors="np",
    )
    return {
        "input_features": features["input_features"].astype(np.float32),
        "input_features_mask": features["attention_mask"].astype(np.int64),
    }


def load_images(images, max_image_pixels: int) -> list[Image.Image]:
    """Flatten `images` into a list of RGB PIL images, checking each.

    Grayscale and palette images are converted to RGB; images with an alpha channel or a transparent colour are
    composited onto white; 16-bit images are scaled to 8 bits. Images with more than `max_image_pixels` pixels are
    refused before they are decoded.

    Args:
        images: one image, a flat list, or one list per sample. Each is a PIL image, a file path, an `http(s)` URL,
            encoded bytes, or an `(H, W)`, `(H, W, C)` or `(C, H, W)` array or tensor (`uint8`, `uint16`, or floats in
            `[0, 1]`).
        max_image_pixels (`int`): largest accepted `width * height`, checked before a file's pixels are decoded.

    Returns:
        `list[PIL.Image.Image]`: the images in order, in mode RGB.
    """
    if _is_single_image(images):
        images = [images]
    flat = []
    for item in images:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return [_load_image(image, index, max_image_pixels) for index, image in enumerate(flat)]


def load_audio_clips(
    audio,
    target_rate: int,
    hop_length: int,
    audio_conv_stride: int,
    audio_max_frames: int,
    sampling_rate: int | None = None,
    resample_audio: bool = False,
) -> list[np.ndarray]:
    """Turn `audio` into checked mono float32 clips at `target_rate`.

    Integer PCM is scaled to `[-1, 1]`; multi-channel clips are averaged to mono; a clip sampled at another
    `sampling_rate` raises unless `resample_audio=True`. Each clip is zero-padded to a whole number of hops, so its
    token count does not depend on the other clips of the batch.

    Args:
        audio: one clip (a 1-D array, tensor or list of numbers; a 2-D one is multi-channel, its shorter axis the
            channels), a file path or URL, or a list of those.
        target_rate (`int`): the feature extractor's sampling rate, in Hz.
        hop_length (`int`): the feature extractor's samples per frame.
        audio_conv_stride (`int`): frames per audio token; a clip shorter than one token raises.
        audio_max_frames (`int`): the most frames a clip may have; a longer clip raises.
        sampling_rate (`int`, *optional*): the rate of the arrays in `audio`; defaults to `target_rate`.
        resample_audio (`bool`, *optional*, defaults to `False`): resample arrays at another `sampling_rate` to
            `target_rate` instead of raising.

    Returns:
        `list[np.ndarray]`: one float32 waveform per clip, its length a multiple of `hop_length`.
    """
    clips = list(audio) if isinstance(audio, (list, tuple)) and not _is_number_list(audio) else [audio]
    if sampling_rate is not None and sampling_rate != target_rate and not resample_audio:
        raise ValueError(
            f"audio sampled at {sampling_rate} Hz but the feature extractor expects {target_rate} Hz; resample it "
            "or pass resample_audio=True"
        )
    min_samples = audio_conv_stride * hop_length
    max_samples = audio_max_frames * hop_length
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
        if waveform.shape[0] < min_samples:
            raise ValueError(
                f"audio {index}: {waveform.shape[0]} samples is shorter than one audio token ({min_samples} "
                f"samples = {min_samples / target_rate:.3f} s at {target_rate} Hz)"
            )
        if waveform.shape[0] > max_samples:
            raise ValueError(
                f"audio {index}: {waveform.shape[0]} samples ({waveform.shape[0] / target_rate:.2f} s) exceeds "
                f"audio_max_frames ({audio_max_frames} frames = {max_samples} samples); split the clip"
            )
        # Zero-pad to whole hops: every clip then gets exactly len / hop_length frames, however it is batched.
        loaded.append(np.pad(waveform, (0, -waveform.shape[0] % hop_length)))
    return loaded


def _is_single_image(images) -> bool:
    return isinstance(images, (Image.Image, str, os.PathLike, bytes, bytearray)) or hasattr(images, "shape")


def _is_number_list(values: Sequence) -> bool:
    return len(values) > 0 and all(isinstance(value, (int, float)) for value in values)


def _load_image(image, index: int, max_image_pixels: int) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if path.startswith(("http://", "https://")):
            image = load_image(path)
        elif not os.path.isfile(path):
            raise ValueError(f"image {index}: the file {path!r} does not exist")
        else:
            image = _open_image(path, index, max_image_pixels)
    elif isinstance(image, (bytes, bytearray)):
        image = _open_image(io.BytesIO(image), index, max_image_pixels)
    elif isinstance(image, Image.Image):
        _check_image_size(image.width, image.height, index, max_image_pixels)
    elif hasattr(image, "shape"):
        image = _image_from_array(np.asarray(image), index, max_image_pixels)
    else:
        raise ValueError(f"image {index}: expected a PIL image, a path, bytes or an array, got {type(image).__name__}")
    return _to_rgb(image)


def _open_image(source, index: int, max_image_pixels: int) -> Image.Image:
    try:
        # Image.open reads only the header; the pixel limit is checked before any pixel is decoded.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
        _check_image_size(image.width, image.height, index, max_image_pixels)
        image.load()
    except Image.DecompressionBombError as error:
        raise ValueError(f"image {index}: refused as a decompression bomb ({error})") from error
    except (Image.UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"image {index}: cannot decode the image data, corrupt or not an image ({error})") from error
    return image


def _check_image_size(width: int, height: int, index: int, max_image_pixels: int) -> None:
    if width == 0 or height == 0:
        raise ValueError(f"image {index}: zero-size image ({width}x{height})")
    if width * height > max_image_pixels:
        raise ValueError(
            f"image {index}: {width}x{height} = {width * height} pixels exceeds max_image_pixels "
            f"({max_image_pixels}); refused as a possible decompression bomb"
        )


def _image_from_array(array: np.ndarray, index: int, max_image_pixels: int) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"image {index}: expected an array of shape (H, W), (H, W, C) or (C, H, W), got {array.shape}"
        )
    _check_image_size(array.shape[1], array.shape[0], index, max_image_pixels)
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


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as RGB through transformers' `convert_to_rgb` (transparency composited onto white)."""
    if image.mode == "RGB" and "transparency" not in image.info:
        # already what convert_to_rgb returns: skip its three copies of the pixels (149 ms against the image
        # processor's 413 ms on a 4000x3000 photo)
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # convert_to_rgb clips 16-bit pixels at 255 where they must be scaled to 8 bits
        image = Image.fromarray(
            np.clip(np.round(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        )
    elif image.mode == "RGBa":
        # convert_to_rgb finds alpha by an "A" band: premultiplied alpha ("a") would be dropped, not composited
        image = image.convert("RGBA")
    return Image.fromarray(convert_to_rgb(image, return_numpy=True))


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
    # Kept rather than a polyphase resampler: the core may not import scipy, torchaudio or soxr. Against scipy's
    # resample_poly (benchmarks/bench_processor.py): 0.32x its log-mel error (median over clips), 6x its time.
    num_out = max(1, round(waveform.shape[0] * target_rate / source_rate))
    spectrum = np.fft.rfft(waveform)
    resized = np.zeros(num_out // 2 + 1, dtype=spectrum.dtype)
    keep = min(resized.shape[0], spectrum.shape[0])
    resized[:keep] = spectrum[:keep]
    return (np.fft.irfft(resized, n=num_out) * (num_out / waveform.shape[0])).astype(np.float32)
