"""Embeddings into and out of the DeepSeek-V3 multimodal decoder: the modality encoder and the contrastive features.

In (`DeepseekV3MultimodalEmbeddingsMixin`): images become patch embeddings (a strided convolution, optionally after a
small convolutional stem, plus a learned position per patch), audio log-mel frames become frame embeddings (a strided
1-D convolution); both are scattered into the placeholder positions of `input_ids`, and a learned modality-type
embedding is added to every position. Out (`DeepseekV3MultimodalFeaturesMixin`): CLIP-style text, image and audio
embeddings, the decoder's pooled final states through projection heads, and the contrastive loss between them.
Both mixins give `DeepseekV3MultimodalModel` its modules as attributes of the model itself, so their state-dict keys
are `model.image_patch_embedding.weight`, `model.text_projection.weight` and so on.

This file is part of the hub-portable core: it imports only torch, transformers and its sibling core modules.
"""

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling, MoeModelOutputWithPast
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple

from .configuration_deepseekv3 import (
    AUDIO_MODALITY_ID,
    IMAGE_MODALITY_ID,
    TEXT_MODALITY_ID,
    DeepseekV3MultimodalConfig,
)
from .losses_deepseekv3 import contrastive_loss, false_negative_pairs

__all__ = ["DeepseekV3MultimodalEmbeddingsMixin", "DeepseekV3MultimodalFeaturesMixin", "audio_tokens_per_clip"]


class DeepseekV3MultimodalEmbeddingsMixin:
    """Image-patch, audio-frame and modality-type embeddings of [`DeepseekV3MultimodalModel`], and the scatter of
    media features into their placeholder positions."""

    config: DeepseekV3MultimodalConfig
    embed_tokens: nn.Embedding

    def _build_media_embeddings(self, config: DeepseekV3MultimodalConfig) -> None:
        """The modules of the media the config switches on (none for plain DeepSeek-V3); attributes of the model
        itself, so their state-dict keys are `model.image_patch_embedding.weight` and so on."""
        stem_channels = config.image_conv_stem_channels
        self.image_stem = (
            nn.Sequential(
                nn.Conv2d(config.num_channels, stem_channels, 3, padding=1),
                nn.GELU(),
                nn.Conv2d(stem_channels, stem_channels, 3, padding=1),
                nn.GELU(),
            )
            if config.use_image_input and stem_channels > 0
            else None
        )
        if not config.use_image_input:
            self.image_patch_embedding = None
        elif self.image_stem is None:
            self.image_patch_embedding = nn.Conv2d(
                config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size
            )
        else:
            # overlapping windows: each patch token reads its patch and half a patch around it
            self.image_patch_embedding = nn.Conv2d(
                stem_channels,
                config.hidden_size,
                2 * config.patch_size,
                stride=config.patch_size,
                padding=config.patch_size // 2,
            )
        self.image_position_embedding = (
            nn.Embedding(config.num_image_tokens, config.hidden_size) if config.use_image_input else None
        )
        self.audio_frame_embedding = (
            nn.Conv1d(
                config.num_mel_bins, config.hidden_size, config.audio_conv_stride, stride=config.audio_conv_stride
            )
            if config.use_audio_input
            else None
        )
        self.modality_type_embedding = (
            nn.Embedding(config.num_modality_types, config.hidden_size) if config.num_modality_types else None
        )

    def embed_inputs(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.FloatTensor | None,
        pixel_values: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        mm_token_type_ids: torch.LongTensor | None = None,
    ) -> tuple[torch.FloatTensor, torch.LongTensor | None]:
        """Token embeddings with media features scattered into their placeholders and modality types added.

        Returns:
            `(inputs_embeds, block_sequence_ids)`: embeddings `(batch, seq_len, hidden_size)`, and, with
            `use_bidirectional_media_attention` and media present, `(batch, seq_len)` span ids (-1 for text) that
            make each media span attend to itself bidirectionally; else `None`.
        """
        has_media = pixel_values is not None or input_features is not None
        if inputs_embeds is not None and has_media:
            raise ValueError("Media inputs need `input_ids` to locate their placeholders, not `inputs_embeds`")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        block_sequence_ids = None
        if input_ids is not None:
            inputs_embeds, block_sequence_ids = self._scatter_media(
                input_ids, inputs_embeds, pixel_values, input_features, input_features_mask
            )
        if self.modality_type_embedding is not None:
            if mm_token_type_ids is None:
                mm_token_type_ids = self.get_modality_ids(input_ids, inputs_embeds)
            inputs_embeds = inputs_embeds + self.modality_type_embedding(mm_token_type_ids).to(inputs_embeds.dtype)
        if not self.config.use_bidirectional_media_attention:
            block_sequence_ids = None
        return inputs_embeds, block_sequence_ids

    def get_modality_ids(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.FloatTensor
    ) -> torch.LongTensor:
        """Modality of each position (0 text, 1 image, 2 audio) read from the placeholder tokens in `input_ids`."""
        if input_ids is None:
            return torch.full(inputs_embeds.shape[:2], TEXT_MODALITY_ID, device=inputs_embeds.device)
        modality_ids = torch.full_like(input_ids, TEXT_MODALITY_ID)
        if self.config.use_image_input:
            modality_ids = modality_ids.masked_fill(input_ids == self.config.image_token_id, IMAGE_MODALITY_ID)
        if self.config.use_audio_input:
            modality_ids = modality_ids.masked_fill(input_ids == self.config.audio_token_id, AUDIO_MODALITY_ID)
        return modality_ids

    def get_image_coordinates(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.FloatTensor
    ) -> torch.FloatTensor:
        """Row and column of each position's image patch, scaled to [-1, 1]; zeros where there is no image patch.

        Returns:
            `torch.FloatTensor` of shape `(batch, seq_len, 2)`, `(row, column)`. Each image fills
            `config.num_image_tokens` consecutive placeholders in row-major patch order.
        """
        if input_ids is None:
            return inputs_embeds.new_zeros(*inputs_embeds.shape[:2], 2)
        config = self.config
        is_image = input_ids == config.image_token_id
        patch_index = (is_image.long().cumsum(dim=-1) - 1) % config.num_image_tokens
        grid = config.image_size // config.patch_size
        scale = 2.0 / (grid - 1) if grid > 1 else 0.0
        coordinates = torch.stack((patch_index // grid, patch_index % grid), dim=-1).to(inputs_embeds.dtype)
        return (coordinates * scale - 1.0).where(is_image.unsqueeze(-1), 0.0)

    def _scatter_media(
        self,
        input_ids: torch.LongTensor,
        inputs_embeds: torch.FloatTensor,
        pixel_values: torch.FloatTensor | None,
        input_features: torch.FloatTensor | None,
        input_features_mask: torch.Tensor | None,
    ) -> tuple[torch.FloatTensor, torch.LongTensor]:
        num_images, tokens_per_clip = 0, None
        image_mask = self._placeholder_mask(input_ids, "image", pixel_values is not None)
        if pixel_values is not None:
            image_features = self.get_image_embeddings(pixel_values)  # (num_images, tokens, hidden)
            num_images, tokens_per_image = image_features.shape[:2]
            self._check_placeholder_count("image", image_mask, num_images * tokens_per_image, num_images)
            inputs_embeds = inputs_embeds.masked_scatter(
                image_mask.unsqueeze(-1), image_features.reshape(-1, image_features.shape[-1]).to(inputs_embeds)
            )
        audio_mask = self._placeholder_mask(input_ids, "audio", input_features is not None)
        if input_features is not None:
            audio_features, tokens_per_clip = self.get_audio_embeddings(input_features, input_features_mask)
            self._check_placeholder_count("audio", audio_mask, audio_features.shape[0], len(tokens_per_clip))
            inputs_embeds = inputs_embeds.masked_scatter(audio_mask.unsqueeze(-1), audio_features.to(inputs_embeds))
        block_sequence_ids = media_span_ids(
            input_ids, image_mask, num_images, self.config.num_image_tokens, audio_mask, tokens_per_clip
        )
        return inputs_embeds, block_sequence_ids

    def _placeholder_mask(self, input_ids: torch.LongTensor, modality: str, has_media: bool) -> torch.Tensor:
        """Positions of `modality`'s placeholder; a placeholder without media (or media the config lacks) raises."""
        enabled = getattr(self.config, f"use_{modality}_input")
        if not enabled:
            if has_media:
                raise ValueError(f"Got {modality} inputs but the config has use_{modality}_input=False")
            return torch.zeros_like(input_ids, dtype=torch.bool)
        mask = input_ids == getattr(self.config, f"{modality}_token_id")
        # a data-dependent check: skipped under torch.compile, where it would break the graph of every decode step
        if not has_media and not torch.compiler.is_compiling() and bool(mask.any()):
            kind = "pixel_values" if modality == "image" else "input_features"
            raise ValueError(
                f"input_ids contain {int(mask.sum())} {modality} placeholder tokens but no `{kind}` were given"
            )
        return mask

    @staticmethod
    def _check_placeholder_count(modality: str, mask: torch.Tensor, num_tokens: int, num_items: int) -> None:
        num_placeholders = int(mask.sum())
        if num_placeholders != num_tokens:
            raise ValueError(
                f"input_ids contain {num_placeholders} {modality} placeholder tokens but the {num_items} {modality} "
                f"input(s) give {num_tokens} tokens"
            )

    def get_image_embeddings(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """Patch embeddings of images.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, num_channels, image_size, image_size)`).

        Returns:
            `torch.FloatTensor` of shape `(num_images, num_image_tokens, hidden_size)`, patches in row-major order.
        """
        config = self.config
        expected = (config.num_channels, config.image_size, config.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (num_images, {', '.join(map(str, expected))}), "
                f"got {tuple(pixel_values.shape)}"
            )
        pixels = pixel_values.to(self.image_patch_embedding.weight.dtype)
        if self.image_stem is not None:
            pixels = self.image_stem(pixels)
        patches = self.image_patch_embedding(pixels)
        patches = patches.flatten(2).transpose(1, 2)  # (num_images, num_patches, hidden)
        # rotary positions give the decoder the patches' order only; a learned 2-D position per patch (as in ViT)
        # tells it which row and column each patch comes from
        return patches + self.image_position_embedding.weight.to(patches.dtype)

    def get_audio_embeddings(
        self, input_features: torch.FloatTensor, input_features_mask: torch.Tensor | None = None
    ) -> tuple[torch.FloatTensor, torch.LongTensor]:
        """Frame embeddings of audio clips, without the padding frames.

        Args:
            input_features (`torch.FloatTensor` of shape `(num_clips, num_mel_bins, frames)`).
            input_features_mask (`torch.Tensor` of shape `(num_clips, frames)`, *optional*): 1 for real frames.

        Returns:
            `(features, tokens_per_clip)`: `(total_tokens, hidden_size)`, clips concatenated in order, and the
            `(num_clips,)` token count of each clip.
        """
        tokens_per_clip = audio_tokens_per_clip(self.config, input_features, input_features_mask)
        frames = self.audio_frame_embedding(input_features.to(self.audio_frame_embedding.weight.dtype))
        frames = frames.transpose(1, 2)  # (num_clips, frames // stride, hidden)
        is_real = torch.arange(frames.shape[1], device=frames.device) < tokens_per_clip[:, None]
        return frames[is_real], tokens_per_clip


def media_span_ids(
    input_ids: torch.LongTensor,
    image_mask: torch.Tensor,
    num_images: int,
    tokens_per_image: int,
    audio_mask: torch.Tensor,
    tokens_per_clip: torch.LongTensor | None,
) -> torch.LongTensor:
    """The media span of each position: images numbered first, then clips, in order of appearance; -1 for text.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch, seq_len)`).
        image_mask (`torch.Tensor` of shape `(batch, seq_len)`): the image placeholder positions.
        num_images (`int`): how many images fill them (0: no image), each with `tokens_per_image` positions.
        tokens_per_image (`int`): placeholders per image (`config.num_image_tokens`).
        audio_mask (`torch.Tensor` of shape `(batch, seq_len)`): the audio placeholder positions.
        tokens_per_clip (`torch.LongTensor` of shape `(num_clips,)`, *optional*): placeholders per clip
            (`audio_tokens_per_clip`); `None` without audio.

    Returns:
        `torch.LongTensor` of shape `(batch, seq_len)`: the `block_sequence_ids` that open each span both ways.
    """
    span_ids = torch.full_like(input_ids, -1)
    if num_images:
        image_index = torch.arange(num_images, device=input_ids.device).repeat_interleave(tokens_per_image)
        span_ids = span_ids.masked_scatter(image_mask, image_index)
    if tokens_per_clip is not None:
        clip_index = torch.arange(len(tokens_per_clip), device=input_ids.device) + num_images
        span_ids = span_ids.masked_scatter(audio_mask, clip_index.repeat_interleave(tokens_per_clip))
    return span_ids


def audio_tokens_per_clip(
    config: DeepseekV3MultimodalConfig,
    input_features: torch.FloatTensor,
    input_features_mask: torch.Tensor | None = None,
) -> torch.LongTensor:
    """How many placeholder tokens each audio clip fills (its real frames `// audio_conv_stride`), after checking the
    features against the config.

    Args:
        config (`DeepseekV3MultimodalConfig`): the model's configuration.
        input_features (`torch.FloatTensor` of shape `(num_clips, num_mel_bins, frames)`): log-mel features, with
            `audio_conv_stride <= frames <= audio_max_frames`.
        input_features_mask (`torch.Tensor` of shape `(num_clips, frames)`, *optional*): 1 for real frames (all real
            when omitted).

    Returns:
        `torch.LongTensor` of shape `(num_clips,)`.

    Raises:
        `ValueError`: naming the shape or frame count that does not fit.
    """
    if input_features.ndim != 3 or input_features.shape[1] != config.num_mel_bins:
        raise ValueError(
            f"input_features must have shape (num_clips, {config.num_mel_bins}, frames), "
            f"got {tuple(input_features.shape)}"
        )
    num_clips, _, num_frames = input_features.shape
    if not config.audio_conv_stride <= num_frames <= config.audio_max_frames:
        raise ValueError(
            f"input_features have {num_frames} frames; expected between audio_conv_stride "
            f"({config.audio_conv_stride}) and audio_max_frames ({config.audio_max_frames})"
        )
    if input_features_mask is None:
        valid_frames = torch.full((num_clips,), num_frames, device=input_features.device)
    elif tuple(input_features_mask.shape) != (num_clips, num_frames):
        raise ValueError(
            f"input_features_mask must have shape {(num_clips, num_frames)}, got {tuple(input_features_mask.shape)}"
        )
    else:
        valid_frames = input_features_mask.long().sum(dim=-1)
    return config.get_num_audio_tokens(valid_frames)


class DeepseekV3MultimodalFeaturesMixin:
    """Contrastive (CLIP-style) embeddings read out of the shared decoder of [`DeepseekV3MultimodalModel`]:
    `get_text_features`, `get_image_features` and `get_audio_features` (transformers' multimodal convention), their
    projection heads, and the contrastive loss between them."""

    config: DeepseekV3MultimodalConfig

    def _build_projection_heads(self, config: DeepseekV3MultimodalConfig) -> None:
        """CLIP-style projection heads, one per modality the config has, and the learned temperature
        (`logit_scale`); none without `contrastive_projection_dim`."""
        projection_dim = config.contrastive_projection_dim
        has_projection = projection_dim is not None
        self.text_projection = nn.Linear(config.hidden_size, projection_dim, bias=False) if has_projection else None
        self.image_projection = (
            nn.Linear(config.hidden_size, projection_dim, bias=False)
            if has_projection and config.use_image_input
            else None
        )
        self.audio_projection = (
            nn.Linear(config.hidden_size, projection_dim, bias=False)
            if has_projection and config.use_audio_input
            else None
        )
        self.logit_scale = nn.Parameter(torch.tensor(config.contrastive_logit_scale_init)) if has_projection else None

    def contrastive_loss(
        self,
        text_input_ids: torch.LongTensor,
        text_attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Symmetric InfoNCE between texts and the media they describe, each encoded alone by the shared decoder.

        Args:
            text_input_ids (`torch.LongTensor` of shape `(num_pairs, text_len)`): one text per image, then one per
                audio clip, in that order; text_attention_mask as usual.
            pixel_values, input_features, input_features_mask: the media, as in `forward`.

        Returns:
            `torch.Tensor` of shape `()`: see [`contrastive_loss`]; pairs that share a caption, an image or a clip
            are no negatives of each other ([`false_negative_pairs`]).
        """
        if self.logit_scale is None:
            raise ValueError("contrastive_input_ids need projection heads: set contrastive_projection_dim")
        media_features = []
        if pixel_values is not None:
            media_features.append(self.get_image_features(pixel_values=pixel_values).pooler_output)
        if input_features is not None:
            audio = self.get_audio_features(input_features=input_features, input_features_mask=input_features_mask)
            media_features.append(audio.pooler_output)
        if not media_features:
            raise ValueError("contrastive_input_ids need media to pair with: pass pixel_values and/or input_features")
        media_features = torch.cat(media_features)
        if media_features.shape[0] != text_input_ids.shape[0]:
            raise ValueError(
                f"contrastive_input_ids has {text_input_ids.shape[0]} texts but there are {media_features.shape[0]} "
                "images and audio clips; pair one text with each"
            )
        text_features = self.get_text_features(input_ids=text_input_ids, attention_mask=text_attention_mask)
        is_false_negative = false_negative_pairs(
            text_input_ids, text_attention_mask, pixel_values, input_features, input_features_mask
        )
        return contrastive_loss(text_features.pooler_output, media_features, self.logit_scale, is_false_negative)

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """Text embeddings for contrastive alignment: the decoder's final states, mean-pooled over the real tokens,
        projected by `text_projection`. Without projection heads (`contrastive_projection_dim=None`) the pooled state
        is returned unprojected.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`), attention_mask (`(batch, seq_len)`).
            **kwargs: passed on to `forward` (`output_hidden_states`, `output_attentions`, ...).

        Returns:
            [`~modeling_outputs.BaseModelOutputWithPooling`]: `pooler_output` `(batch, contrastive_projection_dim)`,
            or `(batch, hidden_size)` without projection heads (not normalized, as in CLIP); the decoder's
            `last_hidden_state`, and `hidden_states` and `attentions` when asked for.
        """
        outputs = self(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True, **kwargs)
        return _pooled_output(outputs, _masked_mean(outputs.last_hidden_state, attention_mask), self.text_projection)

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.FloatTensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """Image embeddings for contrastive alignment: each image alone through the shared decoder, mean-pooled,
        projected by `image_projection` (unprojected without projection heads).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, num_channels, image_size, image_size)`).
            **kwargs: passed on to `forward`.

        Returns:
            [`~modeling_outputs.BaseModelOutputWithPooling`]: as [`get_text_features`], over `num_images` rows of
            `num_image_tokens` positions.
        """
        self._require_input("image")
        num_tokens, token_id = self.config.num_image_tokens, self.config.image_token_id
        input_ids = torch.full((pixel_values.shape[0], num_tokens), token_id, device=self.device)
        outputs = self(input_ids=input_ids, pixel_values=pixel_values, use_cache=False, return_dict=True, **kwargs)
        return _pooled_output(outputs, outputs.last_hidden_state.mean(dim=1), self.image_projection)

    @can_return_tuple
    def get_audio_features(
        self,
        input_features: torch.FloatTensor,
        input_features_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """Audio embeddings for contrastive alignment: each clip alone through the shared decoder, mean-pooled over
        its real frames' tokens, projected by `audio_projection` (unprojected without projection heads).

        Args:
            input_features (`torch.FloatTensor` of shape `(num_clips, num_mel_bins, frames)`).
            input_features_mask (`torch.Tensor` of shape `(num_clips, frames)`, *optional*): 1 for real frames.
            **kwargs: passed on to `forward`.

        Returns:
            [`~modeling_outputs.BaseModelOutputWithPooling`]: as [`get_text_features`], one row per clip (right
            padded to the longest).
        """
        self._require_input("audio")
        tokens_per_clip = audio_tokens_per_clip(self.config, input_features, input_features_mask)
        positions = torch.arange(int(tokens_per_clip.max()), device=input_features.device)
        attention_mask = (positions < tokens_per_clip[:, None]).long()  # right padding
        input_ids = torch.where(attention_mask.bool(), self.config.audio_token_id, self.config.pad_token_id or 0)
        outputs = self(
            input_ids=input_ids,
            attention_mask=attention_mask,
            input_features=input_features,
            input_features_mask=input_features_mask,
            use_cache=False,
            return_dict=True,
            **kwargs,
        )
        pooled = _masked_mean(outputs.last_hidden_state, attention_mask)
        return _pooled_output(outputs, pooled, self.audio_projection)

    def _require_input(self, modality: str) -> None:
        if not getattr(self.config, f"use_{modality}_input"):
            raise ValueError(f"get_{modality}_features needs use_{modality}_input=True")


def _masked_mean(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the sequence of `(batch, seq_len, hidden)` states, padding positions excluded."""
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _pooled_output(
    outputs: MoeModelOutputWithPast, pooled: torch.Tensor, projection: nn.Linear | None
) -> BaseModelOutputWithPooling:
    """A `get_*_features` result: the decoder's outputs with `pooled` (projected, with a head) as `pooler_output`."""
    return BaseModelOutputWithPooling(
        last_hidden_state=outputs.last_hidden_state,
        pooler_output=pooled if projection is None else projection(pooled),
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )
