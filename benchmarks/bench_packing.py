"""Training throughput with packed rows versus padded batches, on a length-skewed set of multimodal examples.

One pool of tokenized examples whose lengths are log-normal (median 60 tokens, a long tail up to the 512-token row
budget; a quarter of them hold one 16-token image). Every round draws one random batch of 32 examples and runs one
training step (forward, backward, AdamW) on it in each variant, interleaved:

- packed: `MultimodalPackingCollator(max_tokens_per_row=512)`, block-diagonal attention, no padding but each row's
  tail;
- padded: `MultimodalPaddingCollator`, every example padded to the longest of *its own* random batch, as a default
  collator does (not to the global maximum, which would flatter packing);
- padded, length-grouped (for information): the same padding, with batches drawn by transformers'
  `LengthGroupedSampler` (`length_grouped_sampler`), so each batch holds examples of similar length. Its batches
  differ from the other two variants', so it is compared through medians only.

The figure of merit is non-pad tokens per second, packed over padded, on the same batches (the median of the
per-round ratios); target >= 2.5. Each variant trains its own copy of the same initial model, with sdpa attention
(experts: `grouped_mm` on CUDA, the `eager` per-expert loop on CPU, where it is the faster one).

    python benchmarks/bench_packing.py                  # about 3 minutes on 2 CPU cores
    python benchmarks/bench_packing.py --device cuda
    python benchmarks/bench_packing.py --full           # more rounds
"""

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from _harness import source_info

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.training.packing import MultimodalPackingCollator, MultimodalPaddingCollator, length_grouped_sampler

TARGET_RATIO = 2.5
MAX_TOKENS_PER_ROW = 512
EXAMPLES_PER_STEP = 32
POOL_SIZE = 1024
MEDIAN_LENGTH, LENGTH_SIGMA, MIN_LENGTH = 60, 0.9, 8
IMAGE_FRACTION = 0.25
RESULTS = Path(__file__).resolve().parent / "results" / "bench_packing.json"

CONFIG_KWARGS = {
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 8,
    "n_group": 4,
    "topk_group": 2,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 32,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "max_position_embeddings": MAX_TOKENS_PER_ROW,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "use_attention_gate": True,
    "use_image_input": True,
    "image_size": 16,
    "patch_size": 4,
    "image_token_id": 3,
    "num_modality_types": 3,
}


def make_pool(config: DeepseekV3MultimodalConfig, seed: int = 0) -> list[dict]:
    """Tokenized examples with log-normal lengths; placeholders are labelled -100, as in training."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(np.log(MEDIAN_LENGTH), LENGTH_SIGMA, POOL_SIZE)).astype(int)
    lengths = np.clip(lengths, MIN_LENGTH, MAX_TOKENS_PER_ROW)
    pool = []
    for length in lengths.tolist():
        input_ids = torch.from_numpy(rng.integers(5, config.vocab_size, length))
        example = {"input_ids": input_ids, "labels": input_ids.clone()}
        if length > config.num_image_tokens + 2 and rng.random() < IMAGE_FRACTION:
            start = int(rng.integers(1, length - config.num_image_tokens))
            input_ids[start : start + config.num_image_tokens] = config.image_token_id
            example["labels"][start : start + config.num_image_tokens] = -100
            example["pixel_values"] = torch.from_numpy(rng.standard_normal((1, 3, 16, 16)).astype(np.float32))
        pool.append(example)
    return pool


def non_pad_tokens(examples: list[dict]) -> int:
    return sum(len(example["input_ids"]) for example in examples)


def train_step(model, optimizer, batch: dict, device: torch.device) -> float:
    """One optimizer step; returns its wall-clock seconds."""
    batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--full", action="store_true", help="21 rounds instead of 7")
    args = parser.parse_args()
    rounds = 21 if args.full else 7
    device = torch.device(args.device)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)

    config = DeepseekV3MultimodalConfig(**CONFIG_KWARGS)
    config._attn_implementation = "sdpa"
    pool = make_pool(config)
    collators = {
        "packed": MultimodalPackingCollator(config, MAX_TOKENS_PER_ROW),
        "padded": MultimodalPaddingCollator(config),
        "padded, length-grouped": MultimodalPaddingCollator(config),
    }
    # One model, one copy per variant: each variant trains its own trajectory from the same weights.
    initial = DeepseekV3MultimodalForConditionalGeneration(config).to(device).train()
    # grouped_mm (the default) suits GPUs; on 2 CPU cores the per-expert loop measured ~7x faster at this size
    experts_implementation = "grouped_mm" if device.type == "cuda" else "eager"
    initial.set_experts_implementation(experts_implementation)
    models = {name: copy.deepcopy(initial) for name in collators}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}

    generator = torch.Generator().manual_seed(1)
    random_batches = [
        [pool[i] for i in torch.randperm(POOL_SIZE, generator=generator)[:EXAMPLES_PER_STEP].tolist()]
        for _ in range(rounds + 1)
    ]
    grouped_order = list(length_grouped_sampler([len(e["input_ids"]) for e in pool], EXAMPLES_PER_STEP, seed=1))
    grouped_batches = [
        [pool[i] for i in grouped_order[k * EXAMPLES_PER_STEP : (k + 1) * EXAMPLES_PER_STEP]]
        for k in range(rounds + 1)
    ]
    # The grouped sampler puts the longest example first; skip that batch (the warm-up takes it) for a fair median.
    batches = {"packed": random_batches, "padded": random_batches, "padded, length-grouped": grouped_batches}

    records = {name: [] for name in collators}
    for step in range(rounds + 1):  # step 0 is the warm-up
        for name, collator in collators.items():
            examples = batches[name][step]
            batch = collator(examples)
            seconds = train_step(models[name], optimizers[name], batch, device)
            if step > 0:
                tokens = non_pad_tokens(examples)
                slots = batch["input_ids"].numel()
                records[name].append(
                    {"seconds": seconds, "tokens": tokens, "slots": slots, "rows": len(batch["input_ids"])}
                )

    summary = {}
    for name, steps in records.items():
        summary[name] = {
            "median_seconds_per_step": statistics.median(s["seconds"] for s in steps),
            "median_tokens_per_s": statistics.median(s["tokens"] / s["seconds"] for s in steps),
            "median_rows": statistics.median(s["rows"] for s in steps),
            "pad_fraction": 1 - sum(s["tokens"] for s in steps) / sum(s["slots"] for s in steps),
        }
    paired_ratios = [
        (packed["tokens"] / packed["seconds"]) / (padded["tokens"] / padded["seconds"])
        for packed, padded in zip(records["packed"], records["padded"])
    ]
    ratio = statistics.median(paired_ratios)
    grouped_ratio = summary["packed"]["median_tokens_per_s"] / summary["padded, length-grouped"]["median_tokens_per_s"]

    print(f"{EXAMPLES_PER_STEP} examples per step, {rounds} interleaved rounds on {device.type}, medians")
    print(f"{'variant':<24} {'s/step':>8} {'tokens/s':>10} {'rows':>5} {'pad %':>6}")
    for name, figures in summary.items():
        print(
            f"{name:<24} {figures['median_seconds_per_step']:>8.3f} {figures['median_tokens_per_s']:>10.0f} "
            f"{figures['median_rows']:>5.0f} {100 * figures['pad_fraction']:>6.1f}"
        )
    print(f"{'packed / padded':<24} {ratio:>8.2f}x  (median of paired rounds; target >= {TARGET_RATIO})")
    print(f"{'packed / length-grouped':<24} {grouped_ratio:>8.2f}x  (ratio of medians; for information)")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_packing.py" + (f" --device {args.device}" if args.device != "cpu" else "")
    RESULTS.write_text(
        json.dumps(
            {
                "script": "benchmarks/bench_packing.py",
                "command": command + (" --full" if args.full else ""),
                "source": source_info(),
                "machine": {
                    "platform": platform.platform(),
                    "processor": platform.processor(),
                    "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                },
                "versions": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "numpy": np.__version__,
                },
                "setup": {
                    "config": CONFIG_KWARGS,
                    "attn_implementation": "sdpa",
                    "experts_implementation": experts_implementation,
                    "max_tokens_per_row": MAX_TOKENS_PER_ROW,
                    "examples_per_step": EXAMPLES_PER_STEP,
                    "pool_size": POOL_SIZE,
                    "length_distribution": {
                        "kind": "log-normal",
                        "median": MEDIAN_LENGTH,
                        "sigma": LENGTH_SIGMA,
                        "clipped_to": [MIN_LENGTH, MAX_TOKENS_PER_ROW],
                        "image_fraction": IMAGE_FRACTION,
                    },
                    "padded_baseline": "each random batch padded to its own longest example",
                    "rounds": rounds,
                },
                "steps": records,
                "summary": summary,
                "paired_ratios": paired_ratios,
                "packed_vs_length_grouped_tokens_per_s": grouped_ratio,
                "headline": [
                    {
                        "name": "packed_vs_padded_tokens_per_s",
                        "value": round(ratio, 3),
                        "target": TARGET_RATIO,
                        "higher_is_better": True,
                    }
                ],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
