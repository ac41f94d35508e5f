"""Why the demo model reads shapes badly: the same image front end, read with and without a hop through the question.

`bench_alignment` finds every variant below the picture-guess floor on shape questions ("what shape is the red
object?"). This benchmark isolates the reading. Each run trains, from scratch, the demo model's image front end (its
conv stem, overlapping patch projection and learned patch positions: `DeepseekV3MultimodalModel`'s own modules, built
from `demo_config`) with a small `torch.nn.TransformerEncoder` reader on one task: the shape of the object of a given
colour, on the demo's images (every object of every training image is one example; every object of the validation
images is scored). The readers differ in one thing:

- `direct`: the colour's embedding is the query of one attention over the image's patch tokens (after one
  bidirectional layer over them), and the answer is read there;
- `one hop`: the colour is a token after the image and the answer is read at the next position, causally, as the
  decoder reads "...is the red object? <|assistant|>": the reading position must first fetch the colour from the
  question before it can look the object up (three layers, the image's patches attending to one another both ways);
- `direct, init 0.02`: `direct` with its attention and linear weights drawn at std 0.02, the decoder's
  `initializer_range`, instead of PyTorch's fan-in scaled defaults;
- `decoder`: the demo model itself (`DeepseekV3MultimodalForConditionalGeneration` from `demo_config`: MLA, MoE,
  head gates, its front end) given the `one hop` input as tokens, `[16 patch placeholders] [colour] [read]`, each
  colour and shape its own token id, the answer read from its logits at the read position (over the three shape
  tokens). The task, data, steps and optimiser are `one hop`'s;
- `decoder, init 0.1`: `decoder` with `initializer_range=0.1` (about 1 / sqrt(hidden_size), the fan-in scale)
  instead of 0.02.

Every model is built from `demo_config` at `initializer_range` 0.02 (the DeepSeek-V3 config's value, and the demo's
until this benchmark led it to 0.1), but for `decoder, init 0.1`.

Every run takes the same steps of the same batch size, at the demo's learning rate (AdamW, 1e-3); three seeds each.
Validation accuracy is measured in eval mode (the encoder readers' dropout off). Nothing here plants the answer: the
reader sees only the pixels and the colour.

    .venv/bin/python benchmarks/bench_shape_reading.py [--steps 1200] [--seeds 0 1 2]
"""

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from _harness import source_info
from torch import nn

from deepseekv3.data import build_shapes_dataset
from deepseekv3.data.questions import COLORS, SHAPES
from deepseekv3.modeling_deepseekv3 import DeepseekV3MultimodalForConditionalGeneration, DeepseekV3MultimodalModel
from deepseekv3.tokenization import train_tokenizer
from deepseekv3.training.demo import DemoSettings, demo_config

READERS = ("direct", "one hop", "direct, init 0.02", "decoder", "decoder, init 0.1")
RESULTS = Path(__file__).parent / "results" / "bench_shape_reading.json"


def _examples(settings: DemoSettings, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels in [-1, 1] as the processor gives them, (image index, colour, shape) per object) of one split."""
    data = build_shapes_dataset(
        settings.num_images, seed=settings.data_seed, image_size=settings.image_size, split_sizes=settings.split_sizes
    )[split]
    pixels = np.stack([np.asarray(image, dtype=np.float32) / 127.5 - 1.0 for image in data["image"]])
    objects = [
        (index, COLORS.index(item["color"]), SHAPES.index(item["shape"]))
        for index, row in enumerate(data["objects"])
        for item in row
    ]
    return torch.from_numpy(pixels).permute(0, 3, 1, 2), torch.tensor(objects)


class Reader(nn.Module):
    """The demo model's image front end and one of `READERS` on top."""

    def __init__(self, config, reader: str):
        super().__init__()
        front = DeepseekV3MultimodalModel(config)
        self.stem, self.patches, self.positions = (
            front.image_stem,
            front.image_patch_embedding,
            front.image_position_embedding,
        )
        hidden, self.reader = config.hidden_size, reader
        layer = nn.TransformerEncoderLayer(hidden, 4, 2 * hidden, batch_first=True, norm_first=True)
        self.colors = nn.Embedding(len(COLORS), hidden)
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, len(SHAPES)))
        if reader == "one hop":
            self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
            self.read_token = nn.Parameter(torch.randn(1, 1, hidden))
            tokens = config.num_image_tokens + 2
            mask = torch.full((tokens, tokens), float("-inf")).triu(1)
            mask[: config.num_image_tokens, : config.num_image_tokens] = 0.0
            self.register_buffer("mask", mask)
        else:
            self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.attention = nn.MultiheadAttention(hidden, 4, batch_first=True)
        if reader == "direct, init 0.02":
            for module in [self.encoder, self.attention, self.head]:
                for parameter in module.parameters():
                    if parameter.dim() == 2:
                        nn.init.normal_(parameter, std=0.02)

    def forward(self, pixels: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(self.stem(pixels)).flatten(2).transpose(1, 2) + self.positions.weight
        query = self.colors(colors).unsqueeze(1)
        if self.reader == "one hop":
            sequence = torch.cat([tokens, query, self.read_token.expand(len(query), 1, -1)], dim=1)
            return self.head(self.encoder(sequence, mask=self.mask)[:, -1])
        tokens = self.encoder(tokens)
        return self.head(self.attention(query, tokens, tokens)[0][:, 0])


class DecoderReader(nn.Module):
    """The whole demo model reading `[patches] [colour] [read]`: the shape tokens' logits at the read position."""

    def __init__(self, config):
        super().__init__()
        self.model = DeepseekV3MultimodalForConditionalGeneration(config)
        if not torch.cuda.is_available():
            self.model.set_experts_implementation("eager")
        # token ids of their own, away from the placeholders and special tokens
        self.register_buffer("color_ids", torch.arange(100, 100 + len(COLORS)))
        self.register_buffer("shape_ids", torch.arange(110, 110 + len(SHAPES)))
        self.read_id, self.image_token_id = 120, config.image_token_id
        self.num_image_tokens = config.num_image_tokens

    def forward(self, pixels: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
        patches = torch.full((len(colors), self.num_image_tokens), self.image_token_id, device=colors.device)
        read = torch.full((len(colors), 1), self.read_id, device=colors.device)
        input_ids = torch.cat([patches, self.color_ids[colors][:, None], read], dim=1)
        return self.model(input_ids=input_ids, pixel_values=pixels).logits[:, -1, self.shape_ids]


def run(reader: str, seed: int, steps: int) -> dict:
    """One reader trained from seed `seed` in a worker process of one torch thread."""
    torch.set_num_threads(1)
    settings = DemoSettings(initializer_range=0.02)
    tokenizer = train_tokenizer(["what shape is the red object?"], vocab_size=settings.vocab_size)
    config = demo_config(tokenizer, settings)
    train, validation = _examples(settings, "train"), _examples(settings, "validation")
    torch.manual_seed(seed)
    if reader.startswith("decoder"):
        if reader == "decoder, init 0.1":
            config.initializer_range = 0.1
        model = DecoderReader(config)
    else:
        model = Reader(config, reader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    (train_pixels, train_objects), (val_pixels, val_objects) = train, validation
    generator = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(1, steps + 1):
        batch = train_objects[torch.randint(len(train_objects), (settings.batch_size,), generator=generator)]
        logits = model(train_pixels[batch[:, 0]], batch[:, 1])
        loss = nn.functional.cross_entropy(logits, batch[:, 2])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % (steps // 4) == 0:
            model.eval()
            with torch.no_grad():
                predicted = torch.cat(
                    [model(val_pixels[chunk[:, 0]], chunk[:, 1]).argmax(dim=-1) for chunk in val_objects.split(512)]
                )
            model.train()
            curve.append((step, float((predicted == val_objects[:, 2]).float().mean())))
    return {
        "reader": reader,
        "seed": seed,
        "curve": curve,
        "validation_accuracy": curve[-1][1],
        "train_objects": len(train_objects),
        "validation_objects": len(val_objects),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, one process of one thread each")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    settings = DemoSettings()
    planned = [(reader, seed) for reader in READERS for seed in args.seeds]
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        runs = list(pool.map(run, *zip(*planned), [args.steps] * len(planned)))
    for r in runs:
        print(f"{r['reader']:>18} seed {r['seed']}: " + ", ".join(f"{s} {a:.2f}" for s, a in r["curve"]))
    summary = {}
    for reader in READERS:
        values = [r["validation_accuracy"] for r in runs if r["reader"] == reader]
        summary[reader] = {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    lines = ["| reader | shape accuracy (validation) |", "| --- | ---: |", "| chance | 0.33 |"]
    lines += [f"| {name} | {s['mean']:.2f} ± {s['sd']:.2f} |" for name, s in summary.items()]
    table = "\n".join(lines)
    print(table)
    result = {
        "benchmark": "bench_shape_reading",
        "command": f"benchmarks/bench_shape_reading.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}",
        "machine": {"workers": args.workers, "threads_per_worker": 1, "torch": torch.__version__},
        "source": source_info(),
        "steps": args.steps,
        "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "train_objects": runs[0]["train_objects"],
        "validation_objects": runs[0]["validation_objects"],
        "runs": runs,
        "summary": summary,
        "table": table,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
