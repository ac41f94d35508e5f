"""Pipeline parallelism for `DeepseekV3MultimodalForConditionalGeneration` on `torch.distributed.pipelining`.

The decoder layers are split into consecutive stages, one per pipeline rank, as transformers splits them
(`DistributedConfig(pp_size=...)`: the remainder goes to the first stages, one layer each). The first stage also
holds the token embeddings and the image and audio front ends (the media scatter happens there); the last, the final
norm and the LM head. torch's schedules (`ScheduleGPipe`, `Schedule1F1B`) run the micro-batches and send the hidden
states between stages; this module adds only what they need from this model:

- `DeepseekV3MultimodalPipelineStage`: one stage as an `nn.Module`, whose parameter names are the full model's
  (`model.layers.5.…`, `lm_head.weight`), so a stage's state dict is the slice of the checkpoint it holds;
- `pipeline_inputs`: a batch as the schedules split it. Every stage receives the token ids, the padding mask and the
  media spans (for its masks and image position values); the whole batch's images and clips travel whole, with the
  row each belongs to, so that each micro-batch takes its own whatever the number of images per row;
- `PipelineParallel`: the stage, torch's `PipelineStage` and a schedule, with the language-model loss normalised over
  the whole batch (and over the data-parallel ranks), so that the gradients equal one process's on the same batch.

Data parallel composes by giving `data_parallel_group` (each stage is sharded over its replicas with FSDP2, which
torch's schedules synchronise once per step); tensor parallel by loading the model with transformers'
`DistributedConfig(pp_size=..., tp_size=...)`, whose pipeline split this module reads and keeps.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from transformers.distributed.pipeline_parallel import PipelineIdentityLayer
from transformers.distributed.tensor_parallel import apply_tensor_parallelism

from ..embeddings_deepseekv3 import audio_tokens_per_clip, media_span_ids
from ..losses_deepseekv3 import expert_load
from ..modeling_deepseekv3 import DeepseekV3MultimodalForConditionalGeneration, _token_mask

__all__ = ["SCHEDULES", "DeepseekV3MultimodalPipelineStage", "PipelineParallel", "pipeline_inputs", "stage_layers"]

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}

# modules of the decoder that only the first stage runs: the embeddings of tokens, images and audio
_FIRST_STAGE_MODULES = (
    "embed_tokens",
    "image_stem",
    "image_patch_embedding",
    "image_position_embedding",
    "audio_frame_embedding",
    "modality_type_embedding",
)
# the contrastive projection heads (stage 1 of the alignment), which a pipeline does not train
_PROJECTION_MODULES = ("text_projection", "image_projection", "audio_projection", "logit_scale")


def stage_layers(num_layers: int, num_stages: int, stage_index: int) -> range:
    """The decoder layers of one stage: consecutive, as even as can be, the remainder to the first stages (the split
    of transformers' `DistributedConfig(pp_size=...)`).

    Raises:
        `ValueError`: fewer layers than stages, or a stage index outside `[0, num_stages)`.
    """
    if num_stages < 1 or num_layers < num_stages:
        raise ValueError(f"{num_layers} decoder layers cannot be split into {num_stages} pipeline stages")
    if not 0 <= stage_index < num_stages:
        raise ValueError(f"stage_index ({stage_index}) must be in [0, {num_stages})")
    per_stage, remainder = divmod(num_layers, num_stages)
    start = stage_index * per_stage + min(stage_index, remainder)
    return range(start, start + per_stage + (stage_index < remainder))


@dataclass
class BatchMedia:
    """A batch's images and clips with the row each belongs to, passed whole to every micro-batch (torch's
    micro-batch split replicates what is not a tensor); `select` takes a micro-batch's own."""

    pixel_values: torch.Tensor | None
    image_rows: torch.Tensor | None
    input_features: torch.Tensor | None
    input_features_mask: torch.Tensor | None
    clip_rows: torch.Tensor | None

    def select(self, rows: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """`(pixel_values, input_features, input_features_mask)` of the images and clips of `rows`, in order."""
        pixel_values = input_features = input_features_mask = None
        if self.pixel_values is not None:
            pixel_values = self.pixel_values[torch.isin(self.image_rows, rows)]
        if self.input_features is not None:
            keep = torch.isin(self.clip_rows, rows)
            input_features = self.input_features[keep]
            if self.input_features_mask is not None:
                input_features_mask = self.input_features_mask[keep]
        return (
            pixel_values if pixel_values is None or len(pixel_values) else None,
            input_features if input_features is None or len(input_features) else None,
            input_features_mask if input_features is not None and len(input_features) else None,
        )


def _item_rows(mask: torch.Tensor, tokens_per_item: torch.Tensor, modality: str) -> torch.Tensor:
    """The row of each media item, from its placeholders (`mask`, row-major) and its placeholder count."""
    rows = mask.nonzero()[:, 0]
    if int(tokens_per_item.sum()) != len(rows):
        raise ValueError(
            f"input_ids contain {len(rows)} {modality} placeholder tokens but the {len(tokens_per_item)} {modality} "
            f"input(s) give {int(tokens_per_item.sum())} tokens"
        )
    starts = tokens_per_item.cumsum(0) - tokens_per_item
    return rows[starts]


def pipeline_inputs(
    config,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.FloatTensor | None = None,
    input_features: torch.FloatTensor | None = None,
    input_features_mask: torch.Tensor | None = None,
) -> dict:
    """A batch as keyword arguments of `PipelineParallel`'s schedule (and of `DeepseekV3MultimodalPipelineStage`).

    Args:
        config (`DeepseekV3MultimodalConfig`): the model's config.
        input_ids, attention_mask, pixel_values, input_features, input_features_mask: as the model's `forward`
            takes them (the processor's output); images and clips of the whole batch, in order of appearance.

    Returns:
        `dict`: `input_ids`, `attention_mask` (all ones when not given), `media_span_ids` (the media span of each
        position, for the masks of every stage; `None` without bidirectional media attention or media), `row_index`
        (each row's index in the batch) and `media` (a `BatchMedia`, or `None` without media).

    Raises:
        `ValueError`: placeholders that do not match the media given.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch_size = input_ids.shape[0]
    image_mask = input_ids == config.image_token_id if config.use_image_input else torch.zeros_like(input_ids).bool()
    audio_mask = input_ids == config.audio_token_id if config.use_audio_input else torch.zeros_like(input_ids).bool()
    num_images, tokens_per_clip, image_rows, clip_rows = 0, None, None, None
    if pixel_values is not None:
        num_images = len(pixel_values)
        tokens_per_image = torch.full((num_images,), config.num_image_tokens, device=input_ids.device)
        image_rows = _item_rows(image_mask, tokens_per_image, "image")
    elif bool(image_mask.any()):
        raise ValueError(f"input_ids contain {int(image_mask.sum())} image placeholder tokens but no pixel_values")
    if input_features is not None:
        tokens_per_clip = audio_tokens_per_clip(config, input_features, input_features_mask).to(input_ids.device)
        clip_rows = _item_rows(audio_mask, tokens_per_clip, "audio")
    elif bool(audio_mask.any()):
        raise ValueError(f"input_ids contain {int(audio_mask.sum())} audio placeholder tokens but no input_features")
    has_media = pixel_values is not None or input_features is not None
    span_ids = None
    if has_media and config.use_bidirectional_media_attention:
        span_ids = media_span_ids(
            input_ids, image_mask, num_images, config.num_image_tokens, audio_mask, tokens_per_clip
        )
    media = BatchMedia(pixel_values, image_rows, input_features, input_features_mask, clip_rows) if has_media else None
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "media_span_ids": span_ids,
        "row_index": torch.arange(batch_size, device=input_ids.device),
        "media": media,
    }


class DeepseekV3MultimodalPipelineStage(nn.Module):
    """One pipeline stage of a `DeepseekV3MultimodalForConditionalGeneration`.

    The model given is pruned in place: the layers of other stages become transformers' `PipelineIdentityLayer`
    (holding nothing), the embeddings and media front ends stay on the first stage only, the final norm and the LM
    head on the last only, and the contrastive projection heads are dropped. A model loaded with
    `DistributedConfig(pp_size=...)` (already pruned by transformers, possibly tensor-parallel too) is taken as it is.
    Parameter names are the full model's, so `state_dict()` is this stage's slice of the checkpoint.

    Args:
        model (`DeepseekV3MultimodalForConditionalGeneration`): the model (pruned in place).
        stage_index (`int`), num_stages (`int`): this stage and how many there are.

    In training mode with MoE layers and `router_bias_update_rate > 0`, each forward records its stage's expert loads
    (`(MoE layers of this stage, experts)`) for an `ExpertLoadBalancer` built on this module (`pop_expert_load`).

    Raises:
        `ValueError`: a model of another class, tied input and output embeddings over several stages, or an
        impossible split.
    """

    def __init__(self, model: DeepseekV3MultimodalForConditionalGeneration, stage_index: int, num_stages: int):
        super().__init__()
        if not isinstance(model, DeepseekV3MultimodalForConditionalGeneration):
            raise ValueError(
                f"a pipeline stage is built from a DeepseekV3MultimodalForConditionalGeneration, not "
                f"{type(model).__name__}"
            )
        config = model.config
        if num_stages > 1 and config.tie_word_embeddings:
            raise ValueError(
                "tie_word_embeddings=True shares one matrix between the first stage (embeddings) and the last (LM "
                "head): untie them to split the model into pipeline stages"
            )
        self.config = config
        self.stage_index, self.num_stages = stage_index, num_stages
        self.layer_indices = stage_layers(config.num_hidden_layers, num_stages, stage_index)
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        decoder = model.model
        for index in range(config.num_hidden_layers):
            if index not in self.layer_indices:
                decoder.layers[index] = PipelineIdentityLayer()
        for name in _PROJECTION_MODULES + (() if self.is_first else _FIRST_STAGE_MODULES):
            setattr(decoder, name, None)
        if not self.is_last:
            decoder.norm = PipelineIdentityLayer()
        self.model = decoder
        self.lm_head = model.lm_head if self.is_last else None
        self._expert_loads: list[torch.Tensor] = []
        self._moe_layers = [i for i in self.layer_indices if i >= config.first_k_dense_replace]

    def forward(
        self,
        hidden_states: torch.Tensor | None = None,
        *,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        media_span_ids: torch.LongTensor | None = None,
        row_index: torch.LongTensor | None = None,
        media: BatchMedia | None = None,
    ) -> torch.Tensor:
        """One micro-batch through this stage (the keyword arguments are `pipeline_inputs`' split).

        Args:
            hidden_states (`torch.Tensor` of shape `(batch, seq_len, hidden_size)`): the previous stage's output;
                `None` on the first stage, which embeds `input_ids` and the micro-batch's media.

        Returns:
            `torch.Tensor`: the hidden states for the next stage, or, on the last stage, the logits
            `(batch, seq_len, vocab_size)`.
        """
        decoder = self.model
        if self.is_first:
            pixel_values, input_features, input_features_mask = (
                media.select(row_index) if media is not None else (None, None, None)
            )
            hidden_states, _ = decoder.embed_inputs(input_ids, None, pixel_values, input_features, input_features_mask)
        elif hidden_states is None:
            raise ValueError(f"stage {self.stage_index} needs the hidden states of stage {self.stage_index - 1}")
        count_load = self.training and bool(self._moe_layers) and self.config.router_bias_update_rate > 0
        outputs = decoder.decode(
            hidden_states,
            input_ids,
            attention_mask,
            use_cache=False,
            block_sequence_ids=media_span_ids,
            output_router_indices=count_load,
        )
        if count_load:
            token_mask = _token_mask(attention_mask, *input_ids.shape, input_ids.device)
            load = expert_load(outputs.router_indices, token_mask, self.config.n_routed_experts)
            self._expert_loads.append(load)
        hidden_states = outputs.last_hidden_state
        return self.lm_head(hidden_states) if self.is_last else hidden_states

    def pop_expert_load(self, last: int | None = None) -> torch.Tensor | None:
        """The expert loads of the forwards since the last call, summed (`None` if none), then reset.

        Args:
            last (`int`, *optional*): count only the last `last` forwards. torch's schedules run one more forward
                before the first step's micro-batches, to infer the shapes sent between stages (on the next stages
                with uninitialised inputs): its loads are not the batch's.
        """
        loads, self._expert_loads = self._expert_loads, []
        if last is not None:
            loads = loads[-last:]
        return torch.stack(loads).sum(0) if loads else None


def _fully_shard_by_dtype(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """`fully_shard(module)`, after sharding on their own the submodules whose parameters are in another dtype than
    most of the module's (FSDP2 needs one dtype per group: the norms, routers and head gates stay in fp32 in a bf16
    model)."""
    numel_by_dtype: dict[torch.dtype, int] = {}
    for param in module.parameters():
        numel_by_dtype[param.dtype] = numel_by_dtype.get(param.dtype, 0) + param.numel()
    if len(numel_by_dtype) > 1:
        main_dtype = max(numel_by_dtype, key=numel_by_dtype.get)
        for submodule in list(module.modules())[1:]:
            own = list(submodule.parameters(recurse=False))
            if own and all(param.dtype != main_dtype for param in own) and not isinstance(submodule, FSDPModule):
                fully_shard(submodule, mesh=mesh)
    return fully_shard(module, mesh=mesh)


class PipelineParallel:
    """This rank's stage of a pipeline-parallel model, run by one of torch's schedules.

    Every pipeline rank builds it from the same model (pruned in place to its stage) and calls `step` with the same
    batch; the last stage returns the loss. Gradients are left in the stage's parameters for the optimizer, scaled so
    that they equal one process's on the whole batch (summed losses over the label tokens of the batch, all
    data-parallel ranks included), whatever the number of micro-batches.

    Args:
        model (`DeepseekV3MultimodalForConditionalGeneration`): the model. Loaded with transformers'
            `DistributedConfig(pp_size=...)` (and `tp_size` for tensor parallel inside each stage), its stage and
            pipeline group are read from it; otherwise give `stage_index`, `num_stages` and `group`.
        n_microbatches (`int`): micro-batches per step (the batch size must be divisible by it).
        schedule (`str`): `"1f1b"` (default) or `"gpipe"`.
        stage_index (`int`, *optional*), num_stages (`int`, *optional*): this rank's stage and the number of stages.
        group (`ProcessGroup`, *optional*): the pipeline's ranks, in stage order (default: the whole world).
        data_parallel_group (`ProcessGroup`, *optional*): replicas of this stage that train on other slices of the
            data (PP x DP); the stage is sharded over them with FSDP2 (`fully_shard`, each decoder layer and the
            rest), so its parameters and gradients are `DTensor`s.
        tensor_parallel_mesh (`DeviceMesh`, *optional*): a 1-D mesh of the ranks that split this stage by tensor
            parallelism (PP x TP): the model's `tp_plan` (`base_model_tp_plan`) is applied to the stage's modules with
            transformers' `apply_tensor_parallelism`. They all feed the same batch.
        device (`torch.device`, *optional*): the stage's device (default: where its parameters are).

    Example (2 stages x 2 data-parallel replicas, `torchrun --nproc_per_node 4`):

    ```python
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    pipe = PipelineParallel(
        model, n_microbatches=4, stage_index=mesh["pp"].get_local_rank(), num_stages=2,
        group=mesh.get_group("pp"), data_parallel_group=mesh.get_group("dp"),
    )
    optimizer = torch.optim.AdamW(pipe.module.parameters())
    for batch in loader:  # this data-parallel rank's slice, the same on both stages
        loss = pipe.step(**batch)  # the loss on the last stage, None on the others
        optimizer.step(); optimizer.zero_grad(); pipe.balance_experts()
    ```
    """

    def __init__(
        self,
        model: DeepseekV3MultimodalForConditionalGeneration,
        n_microbatches: int,
        schedule: str = "1f1b",
        stage_index: int | None = None,
        num_stages: int | None = None,
        group: dist.ProcessGroup | None = None,
        data_parallel_group: dist.ProcessGroup | None = None,
        tensor_parallel_mesh: DeviceMesh | None = None,
        device: torch.device | None = None,
    ):
        if schedule.lower() not in SCHEDULES:
            raise ValueError(f"schedule ({schedule!r}) must be one of {sorted(SCHEDULES)}")
        pp_stage = getattr(model, "_pp_stage", None)  # transformers' DistributedConfig(pp_size=...)
        if pp_stage is not None:
            given = (stage_index, num_stages)
            if given != (None, None) and given != (pp_stage.pp_rank, pp_stage.pp_size):
                raise ValueError(
                    f"the model was loaded as stage {pp_stage.pp_rank} of {pp_stage.pp_size} (DistributedConfig), "
                    f"not stage {stage_index} of {num_stages}"
                )
            stage_index, num_stages, group = pp_stage.pp_rank, pp_stage.pp_size, pp_stage.pp_group
        if stage_index is None or num_stages is None:
            raise ValueError("give stage_index and num_stages, or load the model with DistributedConfig(pp_size=...)")
        self.loss_function = model.loss_function
        # transformers' expansion of the plan's patterns into module and parameter names (as `from_pretrained` does
        # with `DistributedConfig(tp_size=...)`), taken before pruning and kept for what this stage holds
        tp_plan = model._expand_parallel_plan(model.tp_plan) if tensor_parallel_mesh is not None else {}
        self.module = DeepseekV3MultimodalPipelineStage(model, stage_index, num_stages)
        if tensor_parallel_mesh is not None:
            names = {name for name, _ in self.module.named_modules()} | dict(self.module.named_parameters()).keys()
            stage_plan = {name: style for name, style in tp_plan.items() if name in names}
            apply_tensor_parallelism(self.module, tensor_parallel_mesh, stage_plan)
        if device is None:
            device = next(self.module.parameters()).device
        self.data_parallel_group = data_parallel_group
        self.balancer = None
        if self.module._moe_layers and self.module.config.router_bias_update_rate > 0:
            from ..training.balancing import ExpertLoadBalancer

            # the loads are summed over the replicas of this stage only (never over other stages' layers)
            self.balancer = ExpertLoadBalancer(
                self.module, process_group=data_parallel_group, all_reduce=data_parallel_group is not None
            )
        submodule = self.module
        if data_parallel_group is not None:
            # FSDP2 (ZeRO-3) over the replicas, layer by layer, as torchtitan composes PP with data parallel (torch's
            # schedules sync it once per step); DistributedDataParallel fails under GPipe in torch 2.13 (its
            # reducer counts every parameter twice on the first step)
            mesh = DeviceMesh.from_group(data_parallel_group, device.type)
            for index in self.module.layer_indices:
                _fully_shard_by_dtype(self.module.model.layers[index], mesh)
            submodule = _fully_shard_by_dtype(self.module, mesh)
        self.stage = PipelineStage(submodule, stage_index, num_stages, device, group=group)
        self.n_microbatches = n_microbatches
        self._batch_shape: tuple[int, ...] | None = None
        self.schedule = SCHEDULES[schedule.lower()](self.stage, n_microbatches, loss_fn=self._loss, scale_grads=False)

    @property
    def is_last(self) -> bool:
        return self.module.is_last

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor, scale: float):
        loss = self.loss_function(
            logits, labels, vocab_size=self.module.config.vocab_size, num_items_in_batch=num_items_in_batch
        )
        return loss * scale

    def _batch(self, input_ids, attention_mask, pixel_values, input_features, input_features_mask) -> dict:
        if input_ids.shape[0] % self.n_microbatches:
            raise ValueError(
                f"the batch ({input_ids.shape[0]} rows) must split into n_microbatches ({self.n_microbatches}) equal "
                "micro-batches"
            )
        if self._batch_shape is None:
            self._batch_shape = tuple(input_ids.shape)
        elif tuple(input_ids.shape) != self._batch_shape:
            # the schedule sizes the buffers between stages from its first batch, once
            raise ValueError(
                f"input_ids of shape {tuple(input_ids.shape)}: every batch must have the shape of the first "
                f"{self._batch_shape}, from which torch.distributed.pipelining sized the tensors sent between stages; "
                "pad the batches to one length (the padding mask and labels of -100 keep the loss exact)"
            )
        return pipeline_inputs(
            self.module.config, input_ids, attention_mask, pixel_values, input_features, input_features_mask
        )

    def step(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Forward and backward of one batch through the pipeline (call it on every rank of the pipeline, with the
        same batch): gradients accumulate in `module`'s parameters.

        Args:
            input_ids, labels, attention_mask, pixel_values, input_features, input_features_mask: as the model's
                `forward` takes them; `labels` are shifted inside the loss, -100 is ignored.

        Returns:
            `torch.Tensor`: on the last stage, this rank's share of the loss (the loss of the batch without data
            parallel; with it, the sum over the data-parallel ranks is the global batch's loss); `None` elsewhere.
        """
        kwargs = self._batch(input_ids, attention_mask, pixel_values, input_features, input_features_mask)
        num_items = (labels[..., 1:] != -100).sum()
        scale = 1.0
        if self.data_parallel_group is not None:
            # FSDP averages the gradients over the replicas: normalise by the global count, scale back up
            dist.all_reduce(num_items, group=self.data_parallel_group)
            scale = float(dist.get_world_size(self.data_parallel_group))
        losses = []
        self.schedule.step(
            target=labels if self.is_last else None,
            losses=losses,
            return_outputs=False,
            loss_kwargs={"num_items_in_batch": num_items, "scale": scale},
            **kwargs,
        )
        if self.balancer is not None:
            self.balancer.observe(self.module.pop_expert_load(last=self.n_microbatches))
        if not self.is_last:
            return None
        return torch.stack(losses).sum().detach() / scale

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Forward only (evaluation): the logits `(batch, seq_len, vocab_size)` on the last stage, `None` elsewhere."""
        kwargs = self._batch(input_ids, attention_mask, pixel_values, input_features, input_features_mask)
        return self.schedule.eval(**kwargs)

    def balance_experts(self) -> torch.Tensor | None:
        """DeepSeek-V3's bias rule on this stage's MoE layers, from the loads of the steps since the last call (call
        it after every `optimizer.step()`, on every rank: it all-reduces over `data_parallel_group`). `None` when
        this stage has no MoE layer or the rate is 0."""
        return None if self.balancer is None else self.balancer.step()
