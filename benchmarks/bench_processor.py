"""Overhead of DeepseekV3MultimodalProcessor over calling the same transformers sub-processor directly.

Two workloads, each a batch of 64 at the model's default sizes (224-pixel images in 16-pixel patches; 80-bin
log-mel audio, 4 frames per token):

- images: 64 RGB photos (320x240) through `processor(text=["<image> ..."] * 64, images=...)` versus
  `SiglipImageProcessorPil(images)` alone;
- audio: 64 clips of 1-5 s at 16 kHz through `processor(text=["<audio> ..."] * 64, audio=...)` versus
  `WhisperFeatureExtractor(clips, padding="longest")` alone.

The processor does more than the sub-processor (input checks, placeholder expansion, tokenization, padding, modality
ids); the figure of merit is that extra time as a ratio, target <= 1.10. Variants run interleaved in one process and
the table reports medians. Preprocessing runs on the CPU, so there is no `--device` flag.

    python benchmarks/bench_processor.py          # about 30 s on 2 CPU cores
    python benchmarks/bench_processor.py --full   # more rounds
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import PIL
import tokenizers
import torch
import transformers
from PIL import Image

from deepseekv3.configuration_deepseekv3 import DeepseekV3MultimodalConfig
from deepseekv3.processing_deepseekv3 import DeepseekV3MultimodalProcessor
from deepseekv3.tokenization import load_default_tokenizer

BATCH_SIZE = 64
TARGET_RATIO = 1.10
RESULTS = Path(__file__).resolve().parent / "results" / "bench_processor.json"


def _make_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) for _ in range(BATCH_SIZE)]
    clips = [
        (0.1 * rng.standard_normal(int(rng.integers(16_000, 80_000)))).astype(np.float32) for _ in range(BATCH_SIZE)
    ]
    return images, clips


def _time(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="21 rounds instead of 7")
    args = parser.parse_args()
    rounds = 21 if args.full else 7
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    tokenizer = load_default_tokenizer()
    config = DeepseekV3MultimodalConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_image_input=True,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        use_audio_input=True,
        audio_token_id=tokenizer.convert_tokens_to_ids("<audio>"),
    )
    processor = DeepseekV3MultimodalProcessor.from_config(config, tokenizer)
    images, clips = _make_inputs()
    image_texts = ["<image> What is in the picture?"] * BATCH_SIZE
    audio_texts = ["<audio> What do you hear?"] * BATCH_SIZE

    variants = {
        "images: sub-processor": lambda: processor.image_processor(images, return_tensors="pt"),
        "images: processor": lambda: processor(text=image_texts, images=images, padding=True, return_tensors="pt"),
        "audio: sub-processor": lambda: processor.feature_extractor(
            clips, sampling_rate=16_000, padding="longest", return_attention_mask=True, return_tensors="pt"
        ),
        "audio: processor": lambda: processor(text=audio_texts, audio=clips, padding=True, return_tensors="pt"),
    }
    for function in variants.values():  # warm-up
        function()
    seconds = {name: [] for name in variants}
    for _ in range(rounds):
        for name, function in variants.items():
            seconds[name].append(_time(function))
    medians = {name: statistics.median(values) for name, values in seconds.items()}

    image_ratio = medians["images: processor"] / medians["images: sub-processor"]
    audio_ratio = medians["audio: processor"] / medians["audio: sub-processor"]
    print(f"batch {BATCH_SIZE}, {rounds} interleaved rounds, medians")
    print(f"{'variant':<24} {'median s':>9} {'items/s':>9}")
    for name, median in medians.items():
        print(f"{name:<24} {median:>9.4f} {BATCH_SIZE / median:>9.1f}")
    print(f"{'images: overhead ratio':<24} {image_ratio:>9.3f}  (target <= {TARGET_RATIO})")
    print(f"{'audio: overhead ratio':<24} {audio_ratio:>9.3f}  (target <= {TARGET_RATIO})")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "script": "benchmarks/bench_processor.py",
                "command": "python benchmarks/bench_processor.py" + (" --full" if args.full else ""),
                "machine": {
                    "platform": platform.platform(),
                    "processor": platform.processor(),
                    "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                },
                "versions": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "tokenizers": tokenizers.__version__,
                    "numpy": np.__version__,
                    "pillow": PIL.__version__,
                },
                "batch_size": BATCH_SIZE,
                "rounds": rounds,
                "seconds": seconds,
                "median_seconds": medians,
                "items_per_second": {name: BATCH_SIZE / median for name, median in medians.items()},
                "headline": [
                    {
                        "name": "images: processor / sub-processor time",
                        "value": round(image_ratio, 4),
                        "target": TARGET_RATIO,
                        "higher_is_better": False,
                    },
                    {
                        "name": "audio: processor / sub-processor time",
                        "value": round(audio_ratio, 4),
                        "target": TARGET_RATIO,
                        "higher_is_better": False,
                    },
                ],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
