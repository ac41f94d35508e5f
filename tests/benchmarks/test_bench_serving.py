"""`benchmarks/bench_serving.py`: its batching, answer, latency and arrival helpers, and its two ways of serving a
trace (static `generate` batches, the engine stepped from the benchmark's loop) on a tiny model."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_serving  # noqa: E402

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration  # noqa: E402
from deepseekv3.serving import Engine, EngineConfig  # noqa: E402


def test_static_batch_takes_the_queue_head_within_size_and_budget():
    assert bench_serving.static_batch_size([30] * 20, [32] * 20, 16, 4096) == 16
    assert bench_serving.static_batch_size([30] * 20, [32] * 20, 16, 500) == 8  # 8 x 62 <= 500 < 9 x 62
    # a large max_new_tokens at the fourth request widens every row: 4 x (30 + 128) > 600
    assert bench_serving.static_batch_size([30] * 6, [8, 8, 8, 128, 8, 8], 16, 600) == 3
    assert bench_serving.static_batch_size([30] * 3, [32] * 3, 16, None) == 3
    assert bench_serving.static_batch_size([300], [32], 16, 100) == 1  # alone, a request always runs


def test_answer_keeps_the_stop_token_and_its_own_cap():
    stop = {2, 7}
    assert bench_serving.answer_tokens([5, 6, 7, 0, 0], stop, 8) == [5, 6, 7]
    assert bench_serving.answer_tokens([5, 6, 9, 9, 2], stop, 3) == [5, 6, 9]
    assert bench_serving.answer_tokens([5, 6], stop, 8) == [5, 6]


def test_latency_figures_from_arrivals_and_token_times():
    figures = bench_serving.latency_figures([0.0, 1.0], [[0.5, 0.7, 1.0], [1.2, 1.5]])
    assert figures["tokens"] == 5
    assert figures["tokens_per_s"] == pytest.approx(5 / 1.5)
    assert figures["requests_per_s"] == pytest.approx(2 / 1.5)
    assert figures["ttft_p50_s"] == pytest.approx(0.35)  # first tokens after 0.5 s and 0.2 s
    assert figures["ttft_p99_s"] == pytest.approx(0.2 + 0.99 * 0.3)
    assert figures["itl_p50_s"] == pytest.approx(0.3)  # gaps 0.2, 0.3, 0.3
    assert figures["latency_p99_s"] == pytest.approx(0.5 + 0.99 * 0.5)  # latencies 1.0 and 0.5
    assert bench_serving.latency_figures([0.0], [[0.4]])["itl_p50_s"] is None


def test_poisson_arrivals_have_the_rate_and_repeat_by_seed():
    arrivals = bench_serving.poisson_arrivals(4000, rate=20.0, seed=3)
    gaps = [later - earlier for earlier, later in zip([0.0, *arrivals], arrivals)]
    assert min(gaps) > 0
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 20, rel=0.05)
    assert arrivals == bench_serving.poisson_arrivals(4000, rate=20.0, seed=3)
    assert arrivals != bench_serving.poisson_arrivals(4000, rate=20.0, seed=4)


def test_variation_is_the_coefficient_of_variation():
    assert bench_serving.variation([16, 16, 16]) == 0.0
    assert bench_serving.variation([8, 16, 24]) == pytest.approx((128 / 3) ** 0.5 / 16)
    assert bench_serving.variation([16]) is None


def tiny_requests(count: int) -> list:
    """Image prompts (BOS, the image's placeholders, a few text tokens) with different caps."""
    generator = torch.Generator().manual_seed(0)
    image_tokens = (TINY_MEDIA_KWARGS["image_size"] // TINY_MEDIA_KWARGS["patch_size"]) ** 2
    requests = []
    for index in range(count):
        text = torch.randint(5, TINY_TEXT_KWARGS["vocab_size"], (2 + index,), generator=generator).tolist()
        input_ids = torch.tensor([1] + [TINY_MEDIA_KWARGS["image_token_id"]] * image_tokens + text)
        pixel_values = torch.randn(1, 3, TINY_MEDIA_KWARGS["image_size"], TINY_MEDIA_KWARGS["image_size"])
        requests.append(bench_serving.Request(input_ids, pixel_values, 3 + index % 4, "question", ""))
    return requests


def test_the_engine_and_generate_serve_a_trace_alike():
    """Greedy answers agree; every token has a time, after its request's arrival, in order; the engine's rows per
    decoding step (`stats["decoded_rows"]`) account for every token but each request's first, which its prefill
    gives, and never exceed the batch size."""
    config = DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, **TINY_MEDIA_KWARGS, use_attention_gate=True)
    model = DeepseekV3MultimodalForConditionalGeneration(config).eval()
    requests = tiny_requests(6)
    arrivals = [0.0, 0.0, 0.01, 0.02, 0.05, 0.05]
    sequential = bench_serving.serve_static(model, requests, arrivals, 1, None)
    engine = Engine(model, EngineConfig(max_batch_size=4))
    served = bench_serving.serve_engine(engine, requests, arrivals)
    assert served.answers == sequential.answers
    tokens = sum(map(len, served.answers))
    assert tokens == engine.stats["generated_tokens"] > len(requests)
    for run in (sequential, served):
        assert [len(times) for times in run.token_times] == [len(answer) for answer in run.answers]
        for arrival, times in zip(arrivals, run.token_times):
            assert arrival <= times[0] and times == sorted(times)
        assert sum(run.step_rows) == tokens - len(requests)
        assert len(run.step_rows) == len(run.step_waiting)
    assert max(served.step_rows) <= 4
    assert served.peak_cache_positions > 0
