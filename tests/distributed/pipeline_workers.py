"""Pipeline-parallel worker processes (gloo on CPU), started by torchrun: `pipeline_workers.py MODE MODEL_DIR OUT_DIR`.

Each rank trains its stage for `STEPS` SGD steps on `multimodal_batches()` and writes what it measured (the loss of
each step on the last stage, its stage's gradients after the first step and its weights after the last) to
`OUT_DIR/rank<N>.safetensors` and `OUT_DIR/rank<N>.json`; the tests compare them with one process.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from teardown import exit_process

torch.set_num_threads(1)

STEPS, GLOBAL_BATCH, LEARNING_RATE = 3, 4, 0.1
IMAGE_SIZE, NUM_IMAGE_TOKENS, MEL_BINS, FRAMES, AUDIO_STRIDE = 16, 16, 8, 12, 2
# (images, audio frames or 0) per row: uneven on purpose, so that micro-batches hold different numbers of images,
# clips and label tokens
ROW_MEDIA = [(2, 0), (0, 12), (1, 8), (0, 0)]
SEQ_LEN = 48


def _row(images: int, frames: int, generator: torch.Generator, vocab_size: int) -> torch.Tensor:
    """One row of `SEQ_LEN` ids: text (ids >= 5), image placeholders (3) and audio placeholders (4)."""
    pieces = [torch.tensor([1])]
    for _ in range(images):
        pieces += [torch.randint(5, vocab_size, (2,), generator=generator), torch.full((NUM_IMAGE_TOKENS,), 3)]
    if frames:
        pieces += [torch.randint(5, vocab_size, (2,), generator=generator), torch.full((frames // AUDIO_STRIDE,), 4)]
    used = sum(len(piece) for piece in pieces)
    pieces.append(torch.randint(5, vocab_size, (SEQ_LEN - used,), generator=generator))
    return torch.cat(pieces)


def multimodal_batches(vocab_size: int, steps: int = STEPS, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`steps` batches of `GLOBAL_BATCH` rows with images and clips in `ROW_MEDIA`'s layout, labels on the text."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        input_ids = torch.stack([_row(images, frames, generator, vocab_size) for images, frames in ROW_MEDIA])
        num_images = sum(images for images, _ in ROW_MEDIA)
        clips = [frames for _, frames in ROW_MEDIA if frames]
        input_features_mask = torch.stack([torch.arange(FRAMES) < frames for frames in clips]).long()
        batches.append(
            {
                "input_ids": input_ids,
                "labels": input_ids.masked_fill(input_ids < 5, -100),
                "attention_mask": torch.ones_like(input_ids),
                "pixel_values": torch.randn(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
                "input_features": torch.randn(len(clips), MEL_BINS, FRAMES, generator=generator),
                "input_features_mask": input_features_mask,
            }
        )
    return batches


def data_parallel_slice(batch: dict[str, torch.Tensor], dp_rank: int, dp_size: int) -> dict[str, torch.Tensor]:
    """The rows of one data-parallel rank, with their images and clips."""
    rows = GLOBAL_BATCH // dp_size
    keep = range(dp_rank * rows, (dp_rank + 1) * rows)
    image_rows = [row for row, (images, _) in enumerate(ROW_MEDIA) for _ in range(images)]
    clip_rows = [row for row, (_, frames) in enumerate(ROW_MEDIA) if frames]
    take_images = torch.tensor([row in keep for row in image_rows], dtype=torch.bool)
    take_clips = torch.tensor([row in keep for row in clip_rows], dtype=torch.bool)
    part = {name: batch[name][keep.start : keep.stop] for name in ("input_ids", "labels", "attention_mask")}
    part["pixel_values"] = batch["pixel_values"][take_images] if take_images.any() else None
    part["input_features"] = batch["input_features"][take_clips] if take_clips.any() else None
    part["input_features_mask"] = batch["input_features_mask"][take_clips] if take_clips.any() else None
    return part


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def main(mode: str, model_dir: str, out_dir: str) -> None:
    from deepseekv3 import DeepseekV3MultimodalForConditionalGeneration
    from deepseekv3.distributed import PipelineParallel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if mode == "pp_tp":
        model = DeepseekV3MultimodalForConditionalGeneration.from_pretrained(model_dir).train()
        mesh = dist.device_mesh.init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
        pipe = PipelineParallel(
            model,
            n_microbatches=2,
            stage_index=mesh["pp"].get_local_rank(),
            num_stages=2,
            group=mesh.get_group("pp"),
            tensor_parallel_mesh=mesh["tp"],
        )
        dp_rank, dp_size = 0, 1
    elif mode == "pp_config":
        from transformers.distributed import DistributedConfig

        # transformers' own split (DistributedConfig(pp_size=2)): each rank loads only its stage's weights
        model = DeepseekV3MultimodalForConditionalGeneration.from_pretrained(
            model_dir, distributed_config=DistributedConfig(pp_size=2)
        ).train()
        pipe = PipelineParallel(model, n_microbatches=2, schedule="gpipe")
        dp_rank, dp_size = 0, 1
    else:
        model = DeepseekV3MultimodalForConditionalGeneration.from_pretrained(model_dir).train()
        schedule, dp_size = {"gpipe": ("gpipe", 1), "1f1b": ("1f1b", 1), "pp_dp": ("1f1b", 2)}[mode]
        mesh = dist.device_mesh.init_device_mesh("cpu", (dp_size, 2), mesh_dim_names=("dp", "pp"))
        dp_rank = mesh["dp"].get_local_rank()
        pipe = PipelineParallel(
            model,
            n_microbatches=2 if dp_size > 1 else 4,
            schedule=schedule,
            stage_index=mesh["pp"].get_local_rank(),
            num_stages=2,
            group=mesh.get_group("pp"),
            data_parallel_group=mesh.get_group("dp") if dp_size > 1 else None,
        )
    optimizer = torch.optim.SGD(pipe.module.parameters(), lr=LEARNING_RATE)
    losses, gradients = [], {}
    for step, batch in enumerate(multimodal_batches(model.config.vocab_size)):
        loss = pipe.step(**data_parallel_slice(batch, dp_rank, dp_size))
        if loss is not None:
            losses.append(loss.item())
        if step == 0:
            gradients = {f"grad.{name}": _full(param.grad).clone() for name, param in pipe.module.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
        pipe.balance_experts()
    weights = {f"weight.{name}": _full(value).clone().contiguous() for name, value in pipe.module.state_dict().items()}
    out = Path(out_dir)
    save_file({**gradients, **weights}, str(out / f"rank{rank}.safetensors"))
    sharded = [name for name, param in pipe.module.named_parameters() if hasattr(param, "full_tensor")]
    metrics = {"losses": losses, "stage": pipe.module.stage_index, "tensor_parallel_parameters": sharded}
    (out / f"rank{rank}.json").write_text(json.dumps(metrics))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_process(0)  # see teardown.py: gloo threads outlive destroy_process_group
