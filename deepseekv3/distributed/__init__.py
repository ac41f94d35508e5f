"""Distributed training helpers applied to a built model: pipeline stages and 4-bit gradient compression for DDP.

Data, fully-sharded and tensor parallelism come from the engines users already run (`accelerate launch` with DDP,
FSDP2 or DeepSpeed; `from_pretrained(..., tp_plan="auto")` with the model's `base_model_tp_plan`); this package adds
what they lack: the model's pipeline stages for `torch.distributed.pipelining`'s schedules (`PipelineParallel`), and
a DDP communication hook that exchanges gradients in 4 bits with error feedback.
"""

from .compression import (
    FourBitCompressionCallback,
    FourBitCompressionState,
    compressed_allreduce,
    dequantize_4bit,
    fourbit_hook,
    quantize_4bit,
    register_fourbit_hook,
)
from .pipeline import DeepseekV3MultimodalPipelineStage, PipelineParallel, pipeline_inputs, stage_layers

__all__ = [
    "DeepseekV3MultimodalPipelineStage",
    "PipelineParallel",
    "FourBitCompressionCallback",
    "FourBitCompressionState",
    "compressed_allreduce",
    "dequantize_4bit",
    "fourbit_hook",
    "pipeline_inputs",
    "quantize_4bit",
    "register_fourbit_hook",
    "stage_layers",
]
