"""Overhead of DeepseekV3MultimodalProcessor over its transformers sub-processors; its resampler against scipy's.

Two workloads, each a batch of 64 at the model's default sizes (224-pixel images in 16-pixel patches; 80-bin
log-mel audio, 4 frames per token):

- images: 64 RGB photos (320x240) through `processor(text=["<image> ..."] * 64, images=...)` versus
  `SiglipImageProcessorPil(images)` alone;
- audio: 64 clips of 1-5 s at 16 kHz through `processor(text=["<audio> ..."] * 64, audio=...)` versus
  `WhisperFeatureExtractor(clips, padding="longest")` alone.

The processor does more than the sub-processor (input checks, placeholder expansion, tokenization, padding, modality
ids); the figure of merit is that extra time as a ratio, target <= 1.10. Variants run interleaved in one process and
the table reports medians. Preprocessing runs on the CPU, so there is no `--device` flag.

A second table backs keeping the processor's FFT resampler (`resample_audio=True`), which the hub-portable core keeps
because none of the libraries it may import has a polyphase resampler: against `scipy.signal.resample_poly` (scipy
comes with the `dev` extra), on tones (some above the target Nyquist frequency, which must vanish) at 8, 22.05, 44.1
and 48 kHz, clips of 0.25, 1 and 5 s, resampled to 16 kHz. The reference is the same in-band tones sampled at 16 kHz;
the error is the mean absolute difference of the 80-bin log-mel features the model reads (and, for the waveform, the
signal-to-error ratio in dB), the time a median of interleaved rounds. The headline ratios are FFT / polyphase,
target 1.0: the median over clips of the log-mel error, and the time to resample all the clips.
The FFT's low waveform SNR at 22.05, 44.1 and 48 kHz is its output length, `round(n * 16000 / rate)`: the clip is
stretched by up to half a sample over its length (at most 0.0125% here), which the log-mel features do not see.

    python benchmarks/bench_processor.py          # about 40 s on 2 CPU cores
    python benchmarks/bench_processor.py --full   # more rounds
"""

import argparse
import functools
import json
import math
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
from _harness import source_info
from PIL import Image

from deepseekv3.configuration_deepseekv3 import DeepseekV3MultimodalConfig
from deepseekv3.media_deepseekv3 import _resample
from deepseekv3.processing_deepseekv3 import DeepseekV3MultimodalProcessor
from deepseekv3.tokenization import load_default_tokenizer

BATCH_SIZE = 64
TARGET_RATIO = 1.10
RESAMPLE_TARGET_RATE = 16_000
RESAMPLE_SOURCE_RATES = (8_000, 22_050, 44_100, 48_000)
RESAMPLE_SECONDS = (0.25, 1.0, 5.0)
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


def _tones(rate: int, num_samples: int, frequencies, amplitudes, phases) -> np.ndarray:
    times = np.arange(num_samples) / rate
    return (amplitudes[:, None] * np.sin(2 * np.pi * frequencies[:, None] * times + phases[:, None])).sum(0)


def _resampling_cases(seed: int = 0) -> list[dict]:
    """One clip per (source rate, duration): 24 in-band tones, plus 8 above 8 kHz where the source carries them."""
    rng = np.random.default_rng(seed)
    cases = []
    for source_rate in RESAMPLE_SOURCE_RATES:
        for seconds in RESAMPLE_SECONDS:
            # in-band: below 90% of the lower Nyquist frequency; out-of-band: between 8 kHz and the source's Nyquist
            in_band = rng.uniform(50, 0.45 * min(source_rate, RESAMPLE_TARGET_RATE), 24)
            out_of_band = rng.uniform(8_500, source_rate / 2, 8) if source_rate > 2 * 8_500 else np.zeros(0)
            frequencies = np.concatenate([in_band, out_of_band])
            amplitudes = rng.uniform(0.005, 0.03, frequencies.size)
            phases = rng.uniform(0, 2 * np.pi, frequencies.size)
            num_samples = round(seconds * source_rate) + 1  # odd lengths: neither resampler gets a round number
            clip = _tones(source_rate, num_samples, frequencies, amplitudes, phases).astype(np.float32)
            num_out = round(num_samples * RESAMPLE_TARGET_RATE / source_rate)
            reference = _tones(RESAMPLE_TARGET_RATE, num_out, in_band, amplitudes[:24], phases[:24])
            cases.append({"name": f"{source_rate / 1000:g} kHz, {seconds:g} s", "source_rate": source_rate})
            cases[-1].update(clip=clip, reference=reference.astype(np.float32))
    return cases


def _measure_resampling(feature_extractor, rounds: int) -> dict:
    """Log-mel error, waveform signal-to-error ratio and median time of the FFT and the polyphase resampler."""
    try:
        from scipy.signal import resample_poly
    except ImportError as error:
        raise ImportError("the resampling comparison needs scipy: pip install -e '.[dev]'") from error

    def polyphase(clip, source_rate):
        divisor = math.gcd(source_rate, RESAMPLE_TARGET_RATE)
        return resample_poly(clip, RESAMPLE_TARGET_RATE // divisor, source_rate // divisor).astype(np.float32)

    resamplers = {"fft": lambda clip, rate: _resample(clip, rate, RESAMPLE_TARGET_RATE), "polyphase": polyphase}

    def log_mel(waveform):
        return feature_extractor(waveform, sampling_rate=RESAMPLE_TARGET_RATE, padding="longest", return_tensors="np")[
            "input_features"
        ][0]

    figures = {}
    for case in _resampling_cases():
        reference_features = log_mel(case["reference"])
        row = {}
        for name, resample in resamplers.items():
            # resample_poly returns ceil(n * up / down) samples, the FFT round(n * up / down): compare the shared ones
            waveform = resample(case["clip"], case["source_rate"])[: case["reference"].size]
            error = waveform - case["reference"][: waveform.size]
            row[f"{name} log-mel error"] = float(np.abs(log_mel(waveform) - reference_features).mean())
            row[f"{name} SNR dB"] = float(10 * np.log10(np.sum(case["reference"] ** 2) / np.sum(error**2)))
        seconds = {name: [] for name in resamplers}
        for _ in range(rounds):
            for name, resample in resamplers.items():
                seconds[name].append(_time(functools.partial(resample, case["clip"], case["source_rate"])))
        for name in resamplers:
            row[f"{name} ms"] = 1000 * statistics.median(seconds[name])
        figures[case["name"]] = row
    return figures


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

    resampling = _measure_resampling(processor.feature_extractor, rounds)
    error_ratio = statistics.median(
        row["fft log-mel error"] / row["polyphase log-mel error"] for row in resampling.values()
    )
    # total time over the clips: the per-clip ratios of the 0.25 s clips are fractions of a millisecond, mostly noise
    time_ratio = sum(row["fft ms"] for row in resampling.values()) / sum(
        row["polyphase ms"] for row in resampling.values()
    )
    print(f"\nresampling to 16 kHz: FFT (ours) / scipy resample_poly, {rounds} interleaved rounds, medians")
    print(f"{'clip':<16} {'log-mel error':>17} {'SNR dB':>13} {'ms':>15}")
    for case_name, row in resampling.items():
        print(
            f"{case_name:<16} {row['fft log-mel error']:>8.4f} {row['polyphase log-mel error']:>8.4f}"
            f" {row['fft SNR dB']:>6.1f} {row['polyphase SNR dB']:>6.1f}"
            f" {row['fft ms']:>7.2f} {row['polyphase ms']:>7.2f}"
        )
    print(f"{'median FFT / polyphase log-mel error':<40} {error_ratio:>7.3f}  (target <= 1.0)")
    print(f"{'FFT / polyphase time, all clips':<40} {time_ratio:>7.3f}  (target <= 1.0)")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "script": "benchmarks/bench_processor.py",
                "command": "python benchmarks/bench_processor.py" + (" --full" if args.full else ""),
                "source": source_info(),
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
                "resampling": resampling,
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
                    {
                        "name": "resampling: FFT / polyphase log-mel error (median over clips)",
                        "value": round(error_ratio, 4),
                        "target": 1.0,
                        "higher_is_better": False,
                    },
                    {
                        "name": "resampling: FFT / polyphase time (all clips)",
                        "value": round(time_ratio, 4),
                        "target": 1.0,
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
