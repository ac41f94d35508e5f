"""`benchmarks/bench_head_skipping.py`: the threshold rule, its candidate grid, the measurement over padded batches
(padding never counts) and the paired summary over seeds."""

import random
import sys
from pathlib import Path

import pytest
import torch
from test_head_skipping import NUM_HEADS, model_with_head_closed_for_its_tokens_and_open_at_padding

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_head_skipping  # noqa: E402

from deepseekv3.training.demo import (  # noqa: E402
    QUESTION_TYPES,
    DemoSettings,
    build_demo_model,
    prepare_demo_data,
)
from deepseekv3.training.evaluation import generate_answers, reply_accuracy  # noqa: E402


def test_choose_threshold_takes_the_largest_candidate_that_keeps_the_cosine():
    candidates = [
        {"threshold": 0.0, "cosine_mean": 1.0},
        {"threshold": 0.01, "cosine_mean": 0.995},
        {"threshold": 0.02, "cosine_mean": 0.97},
        {"threshold": 0.03, "cosine_mean": 0.98},  # exactly at the floor: kept; above a failing one: still chosen
        {"threshold": 0.05, "cosine_mean": 0.5},
    ]
    random.Random(0).shuffle(candidates)
    assert bench_head_skipping.choose_threshold(candidates, 0.98) == 0.03
    assert bench_head_skipping.choose_threshold(candidates, 0.99) == 0.01
    failing = [c for c in candidates if c["threshold"] > 0]
    assert bench_head_skipping.choose_threshold(failing, 0.999) == 0.0  # none keeps it: every head computed


def test_choose_threshold_also_keeps_the_accuracy_through_generate_when_given():
    candidates = [
        {"threshold": 0.0, "cosine_mean": 1.0, "generated_accuracy": 0.60},
        {"threshold": 0.1, "cosine_mean": 0.999, "generated_accuracy": 0.61},
        {"threshold": 0.2, "cosine_mean": 0.995, "generated_accuracy": 0.588},  # exactly 98% of 0.60: kept
        {"threshold": 0.5, "cosine_mean": 0.99, "generated_accuracy": 0.30},  # the cosine keeps it, `generate` not
        {"threshold": 0.8, "cosine_mean": 0.97, "generated_accuracy": 0.60},  # `generate` keeps it, the cosine not
    ]
    assert bench_head_skipping.choose_threshold(candidates, 0.98) == 0.5
    assert bench_head_skipping.choose_threshold(candidates, 0.98, min_accuracy=0.98 * 0.60) == 0.2
    assert bench_head_skipping.choose_threshold(candidates, 0.98, min_accuracy=0.605) == 0.1
    assert bench_head_skipping.choose_threshold(candidates, 0.98, min_accuracy=0.7) == 0.0


def test_candidate_thresholds_skip_one_more_head_each_and_add_the_grid():
    # 2 batches x 4 heads; per-head maxima over the batches 0.003, 0.002, 0.6, 0.9
    maxima = torch.tensor([[0.001, 0.002, 0.5, 0.9], [0.003, 0.001, 0.6, 0.8]])
    per_head = bench_head_skipping.candidate_thresholds(maxima, grid=0)
    assert per_head == pytest.approx([0.0, 0.0025, 0.3015, 0.75], abs=1e-6)
    for count, threshold in enumerate(per_head):
        assert int((maxima < threshold).all(dim=0).sum()) == count  # skipped in every batch

    # distinct per-batch maxima 0.001, 0.002, 0.003, 0.5, 0.6, 0.8, 0.9: six midpoints, the first and last at grid 2
    assert bench_head_skipping.candidate_thresholds(maxima, grid=2) == pytest.approx(
        [0.0, 0.0015, 0.0025, 0.3015, 0.75, 0.85], abs=1e-6
    )
    every = bench_head_skipping.candidate_thresholds(maxima, grid=100)
    assert every == pytest.approx([0.0, 0.0015, 0.0025, 0.2515, 0.3015, 0.55, 0.7, 0.75, 0.85], abs=1e-6)
    assert every == sorted(every) and len(set(every)) == len(every)


def test_padded_batches_are_measured_on_their_real_tokens():
    model = model_with_head_closed_for_its_tokens_and_open_at_padding()
    input_ids = torch.full((2, 12), 7)
    input_ids[1, :4] = 0
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    with torch.no_grad():
        gates = model.model(**batch, output_gate_values=True).gate_values[0][..., 1]
    assert gates[1, :4].min() > 0.9 and gates[attention_mask.bool()].max() < 0.01  # open at the pads only

    reference = bench_head_skipping.run_batches(model, [batch], 0.0)
    assert reference["hidden"].shape[0] == int(attention_mask.sum())
    assert reference["maxima"].shape == (1, 2 * NUM_HEADS)
    assert reference["maxima"][0, 1] < 0.01  # the pads' open gates are not the head's maximum
    assert reference["maxima"][0, [0, 2, 3]].min() > 0.5

    figures = bench_head_skipping.measure(model, [batch], 0.01)
    assert figures["skipped_heads_per_layer"] == {"0": [0.0, 1.0, 0.0, 0.0], "1": [0.0] * NUM_HEADS}
    assert figures["heads_skipped_fraction"] == pytest.approx(1 / (2 * NUM_HEADS))
    # one head of eight: less than an eighth of the attention FLOPs (the latent and the gates are computed for all)
    assert 0 < figures["attention_compute_saved"] < 1 / 8
    assert figures["cosine_min"] > 0.9999  # the head's gate was 6e-6: skipping it changes nothing that counts
    assert model.config.attention_gate_skip_threshold == 0.0  # left with every head on

    calibration = bench_head_skipping.calibrate(model, [batch], grid=8, min_cosine=0.98)
    chosen = calibration["threshold"]
    assert chosen > float(reference["maxima"][0, 1])  # it skips the closed head at least
    assert all(c["cosine_mean"] < 0.98 for c in calibration["candidates"] if c["threshold"] > chosen)
    assert bench_head_skipping.chosen_candidate({"validation": calibration})["cosine_mean"] >= 0.98

    # what users get decides too: an accuracy through `generate` that holds only below the closed head's maximum
    closed = float(reference["maxima"][0, 1])
    asked = []

    def ask(threshold):
        asked.append(threshold)
        return {"mean": 0.5 if threshold > closed else 0.8, "attention_flops": 100 - 10 * (threshold > closed)}

    strict = bench_head_skipping.calibrate(model, [batch], grid=8, min_cosine=0.98, ask=ask, min_accuracy_ratio=0.9)
    assert sorted(asked) == [c["threshold"] for c in strict["candidates"]]  # every candidate asked once
    assert strict["generated_accuracy_all_heads"] == 0.8 and strict["min_generated_accuracy"] == pytest.approx(0.72)
    assert strict["threshold"] < closed and strict["threshold"] == max(
        c["threshold"] for c in strict["candidates"] if c["threshold"] < closed
    )
    assert [c["generated_attention_compute_saved"] for c in strict["candidates"]] == [
        pytest.approx(0.1 if c["threshold"] > closed else 0.0) for c in strict["candidates"]
    ]
    assert model.config.attention_gate_skip_threshold == 0.0


def test_generated_figures_ask_through_generate_and_count_its_attention(tmp_path):
    settings = DemoSettings.quick(output_dir=str(tmp_path), baseline=False)
    data = prepare_demo_data(settings, progress=False)
    model, _ = build_demo_model(data.tokenizer, settings)
    model.eval()
    rows = data.rows["validation"].select(range(6))
    data.rows["validation"] = rows

    every_head = bench_head_skipping.generated_figures(model, data, "validation", 0.0)
    replies = generate_answers(model, data.processor, rows, progress=False)
    assert every_head["accuracy"] == reply_accuracy(rows, replies)
    assert every_head["mean"] == pytest.approx(sum(every_head["accuracy"].values()) / len(every_head["accuracy"]))

    # above every gate of the untrained model: every head skipped in every forward, only the latent and gates computed
    none = bench_head_skipping.generated_figures(model, data, "validation", 0.999)
    assert 0 < none["attention_flops"] < every_head["attention_flops"] / 2
    assert model.config.attention_gate_skip_threshold == 0.0  # left with every head on


def run(variant: str, seed: int, accuracy: float, saved: float) -> dict:
    per_type = {q: accuracy for q in QUESTION_TYPES}
    figures = {"attention_compute_saved": saved, "cosine_mean": 0.99, "cosine_min": 0.9}
    generated = {"generated_attention_compute_saved": saved / 2}
    return {
        "variant": variant,
        "seed": seed,
        "validation": {
            "threshold": 0.01,
            "candidates": [{"threshold": 0.01, **figures, **generated, "generated_accuracy": accuracy}],
        },
        "test": {
            "threshold": 0.01,
            "heads_skipped_fraction": saved,
            **figures,
            **generated,
            "accuracy": {
                "all_heads": {"scored": per_type, "generated": per_type},
                "skipping": {"scored": per_type, "generated": {**per_type, "audio": accuracy - 0.1}},
            },
        },
        "long_rows_out_of_training_range": {"4096": {"tokens": 4090, **figures}},
    }


def test_summary_pairs_the_models_of_each_seed():
    runs = [run("penalised", seed, 0.8 + seed / 10, 0.4) for seed in (0, 1, 2)]
    runs += [run("unpenalised", seed, 0.7 + seed / 20, 0.1) for seed in (0, 1, 2)]
    summary = bench_head_skipping.summarize(runs)

    # per seed +0.10, +0.15, +0.20 (audio 0.1 lower with skipping): mean 0.15, sd 0.05, t(2) = 4.303
    difference = summary["differences"]["penalised_skipping - unpenalised"]
    assert difference["scored"]["color"]["mean"] == pytest.approx(0.15)
    half_width = 4.303 * 0.05 / 3**0.5
    assert difference["scored"]["color"]["low"] == pytest.approx(0.15 - half_width)
    assert difference["generated"]["audio"]["mean"] == pytest.approx(0.05)
    assert difference["generated"]["mean of types"]["mean"] == pytest.approx(0.15 - 0.1 / 5)
    assert summary["differences"]["penalised_skipping - penalised"]["generated"]["audio"]["mean"] == pytest.approx(
        -0.1
    )
    assert summary["accuracy"]["unpenalised"]["scored"]["color"] == pytest.approx({"mean": 0.75, "sd": 0.05})
    compute = summary["compute"]["penalised"]
    assert compute["test_attention_compute_saved"] == pytest.approx({"mean": 0.4, "sd": 0.0})
    assert compute["test_generated_attention_compute_saved"] == pytest.approx({"mean": 0.2, "sd": 0.0})
    assert compute["validation_generated_accuracy"] == pytest.approx({"mean": 0.9, "sd": 0.1})
    assert compute["long_rows_out_of_training_range"]["4096"]["tokens"]["mean"] == 4090
    assert summary["compute"]["unpenalised"]["validation_attention_compute_saved"]["mean"] == pytest.approx(0.1)
