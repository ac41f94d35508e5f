"""Packing (DESIGN invariant 5): each packed sequence gets the loss it has alone; nothing crosses a boundary."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MEDIA_KWARGS
from transformers import Trainer, TrainingArguments
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from deepseekv3 import DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.training.packing import (
    MultimodalPackingCollator,
    MultimodalPaddingCollator,
    length_grouped_sampler,
    pack_first_fit_decreasing,
)

IMAGE_TOKEN, AUDIO_TOKEN = TINY_MEDIA_KWARGS["image_token_id"], TINY_MEDIA_KWARGS["audio_token_id"]
NUM_IMAGE_TOKENS = (TINY_MEDIA_KWARGS["image_size"] // TINY_MEDIA_KWARGS["patch_size"]) ** 2
BUDGET = 48


def text(length: int) -> list[int]:
    return torch.randint(5, 96, (length,)).tolist()  # ids 0-4 are special


def make_example(*parts) -> dict:
    """An example from parts: an int is that many text tokens, "image" one image, ("audio", frames, valid) one
    clip of `frames` frames whose first `valid` are real. Placeholders get label -100, as in training."""
    input_ids, images, clips, masks = [], [], [], []
    for part in parts:
        if isinstance(part, int):
            input_ids += text(part)
        elif part == "image":
            input_ids += [IMAGE_TOKEN] * NUM_IMAGE_TOKENS
            images.append(torch.randn(3, 16, 16))
        else:
            _, frames, valid = part
            input_ids += [AUDIO_TOKEN] * (valid // 2)
            clips.append(torch.randn(8, frames))
            masks.append((torch.arange(frames) < valid).long())
    input_ids = torch.tensor(input_ids)
    example = {
        "input_ids": input_ids,
        "labels": input_ids.masked_fill((input_ids == IMAGE_TOKEN) | (input_ids == AUDIO_TOKEN), -100),
        "mm_token_type_ids": (input_ids == IMAGE_TOKEN).long() + 2 * (input_ids == AUDIO_TOKEN).long(),
    }
    if images:
        example["pixel_values"] = torch.stack(images)
    if clips:
        example["input_features"] = torch.stack(clips)
        example["input_features_mask"] = torch.stack(masks)
    return example


def make_examples() -> list[dict]:
    """25, 9, 29, 12 and 36 tokens: at a budget of 48, first-fit decreasing packs rows [3, 4], [1, 2], [0]."""
    return [
        make_example(5, "image", 4),
        make_example(9),
        make_example(2, ("audio", 12, 12), 3, "image", 2),
        make_example(3, ("audio", 10, 8), 5),
        make_example(1, "image", "image", 3),
    ]


@pytest.fixture
def media_config(tiny_config):
    tiny_config.use_bidirectional_media_attention = True
    return tiny_config


def build_model(config, attn_implementation: str = "eager"):
    config._attn_implementation = attn_implementation
    model = DeepseekV3MultimodalForConditionalGeneration(config).eval()
    for name, param in model.named_parameters():  # gates that depend on the input, as after training
        if "head_gate.up_proj" in name:
            torch.nn.init.normal_(param, std=2.0)
    return model


def sequence_spans(examples, budget: int = BUDGET) -> dict[int, tuple[int, int, int]]:
    """Example index -> (row, offset, length) in the packed batch."""
    lengths = [len(example["input_ids"]) for example in examples]
    spans = {}
    for row, indices in enumerate(pack_first_fit_decreasing(lengths, budget)):
        offset = 0
        for index in indices:
            spans[index] = (row, offset, lengths[index])
            offset += lengths[index]
    return spans


def alone(example: dict) -> dict:
    """One example as a batch of one, unpacked."""
    batch = {key: value.unsqueeze(0) for key, value in example.items() if key in ("input_ids", "labels")}
    batch["mm_token_type_ids"] = example["mm_token_type_ids"].unsqueeze(0)
    batch.update(
        {key: example[key] for key in ("pixel_values", "input_features", "input_features_mask") if key in example}
    )
    return batch


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token cross-entropy of `(seq, vocab)` logits (position t predicts label t + 1), and which
    positions count."""
    losses = F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100, reduction="none")
    return losses, labels[1:] != -100


# --- The packing plan ---------------------------------------------------------------------------------------------


def test_first_fit_decreasing_fills_rows_and_never_splits():
    lengths = [25, 9, 29, 12, 36]
    assert pack_first_fit_decreasing(lengths, BUDGET) == [[3, 4], [1, 2], [0]]
    rows = pack_first_fit_decreasing([7, 3, 5, 5, 2, 8, 1], 10)
    assert sorted(i for row in rows for i in row) == list(range(7))
    assert all(sum([7, 3, 5, 5, 2, 8, 1][i] for i in row) <= 10 for row in rows)
    assert len(rows) == 4  # 31 tokens need at least 4 rows of 10


def test_an_example_over_the_budget_raises_naming_both_numbers(tiny_config):
    collator = MultimodalPackingCollator(tiny_config, max_tokens_per_row=BUDGET)
    with pytest.raises(ValueError, match=r"example 1 has 49 tokens, more than max_tokens_per_row \(48\)"):
        collator([make_example(4), make_example(49)])


@pytest.mark.parametrize(
    "example, message",
    [
        ({"input_ids": torch.tensor([], dtype=torch.long)}, "example 0 is empty"),
        ({"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([5, 6])}, "labels has 2 entries, input_ids 3"),
        ({"input_ids": torch.tensor([5, IMAGE_TOKEN, 6])}, "1 image placeholder tokens but its 0 image input"),
        (
            {"input_ids": torch.tensor([5] + [AUDIO_TOKEN] * 3), "input_features": torch.randn(1, 8, 8)},
            "3 audio placeholder tokens but its 1 audio input",
        ),
    ],
)
def test_bad_examples_raise_clear_errors(tiny_config, example, message):
    for collator in (MultimodalPackingCollator(tiny_config, BUDGET), MultimodalPaddingCollator(tiny_config)):
        with pytest.raises(ValueError, match=message):
            collator([example])


def test_bad_settings_raise(tiny_config):
    with pytest.raises(ValueError, match=r"max_tokens_per_row \(129\) must be between 1 and .* \(128\)"):
        MultimodalPackingCollator(tiny_config, max_tokens_per_row=129)
    with pytest.raises(ValueError, match="labels is in examples \\[0\\] but missing"):
        MultimodalPackingCollator(tiny_config, BUDGET)([make_example(3), {"input_ids": torch.tensor([5, 6])}])


# --- The packed batch ---------------------------------------------------------------------------------------------


def test_positions_restart_and_labels_are_ignored_at_starts_and_padding(tiny_config):
    examples = make_examples()
    batch = MultimodalPackingCollator(tiny_config, BUDGET)(examples)
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == (3, BUDGET)
    is_real = torch.zeros(3, BUDGET, dtype=torch.bool)
    starts = torch.zeros(3, BUDGET, dtype=torch.bool)
    for index, (row, offset, length) in sequence_spans(examples).items():
        span = slice(offset, offset + length)
        torch.testing.assert_close(batch["input_ids"][row, span], examples[index]["input_ids"])
        torch.testing.assert_close(batch["position_ids"][row, span], torch.arange(length))
        torch.testing.assert_close(batch["labels"][row, offset + 1 : offset + length], examples[index]["labels"][1:])
        torch.testing.assert_close(batch["mm_token_type_ids"][row, span], examples[index]["mm_token_type_ids"])
        is_real[row, span] = True
        starts[row, offset] = True
    assert (batch["labels"][starts] == -100).all()
    assert (batch["labels"][~is_real] == -100).all() and (
        batch["input_ids"][~is_real] == tiny_config.pad_token_id
    ).all()
    # each row's pad tail restarts at 0: a sequence of its own
    for row, real in enumerate(is_real.sum(dim=1).tolist()):
        torch.testing.assert_close(batch["position_ids"][row, real:], torch.arange(BUDGET - real))


def test_media_follow_the_packed_order(tiny_config):
    examples = make_examples()
    batch = MultimodalPackingCollator(tiny_config, BUDGET)(examples)
    packed_order = [
        index for row in pack_first_fit_decreasing([len(e["input_ids"]) for e in examples], BUDGET) for index in row
    ]
    assert packed_order == [3, 4, 1, 2, 0]
    images = [examples[i]["pixel_values"] for i in packed_order if "pixel_values" in examples[i]]
    torch.testing.assert_close(batch["pixel_values"], torch.cat(images))  # example 4's two images, then 2's, then 0's
    # clips of 10 and 12 frames, in packed order (example 3, then 2), zero-padded to 12 with the mask saying so
    torch.testing.assert_close(batch["input_features"][0, :, :10], examples[3]["input_features"][0])
    assert (batch["input_features"][0, :, 10:] == 0).all()
    torch.testing.assert_close(batch["input_features"][1], examples[2]["input_features"][0])
    assert batch["input_features_mask"].sum(dim=1).tolist() == [8, 12]


def test_flash_attn_kwargs_match_transformers_reading_of_the_position_ids(tiny_config):
    examples = make_examples()
    batch = MultimodalPackingCollator(tiny_config, BUDGET, return_flash_attn_kwargs=True)(examples)
    (cu_seq_lens_q, cu_seq_lens_k), (max_length_q, max_length_k) = prepare_fa_kwargs_from_position_ids(
        batch["position_ids"]
    )
    # rows flattened: [12, 36] [9, 29, pad 10] [25, pad 23]
    assert batch["cu_seq_lens_q"].tolist() == [0, 12, 48, 57, 86, 96, 121, 144]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    torch.testing.assert_close(batch["cu_seq_lens_q"], cu_seq_lens_q)
    torch.testing.assert_close(batch["cu_seq_lens_k"], cu_seq_lens_k)
    assert batch["max_length_q"] == batch["max_length_k"] == int(max_length_q) == int(max_length_k) == 36


def test_padding_collator_pads_to_the_longest_and_ignores_padding(tiny_config):
    examples = make_examples()
    batch = MultimodalPaddingCollator(tiny_config)(examples)
    assert batch["input_ids"].shape == (5, 36)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        torch.testing.assert_close(batch["input_ids"][row, :length], example["input_ids"])
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (36 - length)
        assert (batch["labels"][row, length:] == -100).all()
    images = [example["pixel_values"] for example in examples if "pixel_values" in example]
    torch.testing.assert_close(batch["pixel_values"], torch.cat(images))


def test_padded_batch_gives_each_example_its_loss_alone(media_config):
    model = build_model(media_config, "sdpa")
    examples = make_examples()
    batch = MultimodalPaddingCollator(media_config)(examples)
    with torch.no_grad():
        logits = model(**batch).logits
        for row, example in enumerate(examples):
            losses, counts = token_losses(logits[row], batch["labels"][row])
            alone_loss = model(**alone(example)).loss
            torch.testing.assert_close(losses.sum() / counts.sum(), alone_loss, atol=1e-5, rtol=1e-5, msg=f"row {row}")


def test_missing_labels_default_to_the_input_ids(tiny_config):
    examples = [{"input_ids": torch.tensor(text(4))}, {"input_ids": torch.tensor(text(6))}]
    batch = MultimodalPackingCollator(tiny_config, BUDGET)(examples)
    torch.testing.assert_close(
        batch["labels"][0, :10],
        torch.cat([e["input_ids"] for e in examples]).index_fill(0, torch.tensor([0, 4]), -100),
    )


# --- Invariant 5 through the collator and the model ---------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_losses_equal_each_sequence_alone(media_config, attn_implementation):
    model = build_model(media_config, attn_implementation)
    examples = make_examples()
    batch = MultimodalPackingCollator(media_config, BUDGET)(examples)
    with torch.no_grad():
        outputs = model(**batch)
        packed_losses, total, count = {}, 0.0, 0
        for index, (row, offset, length) in sequence_spans(examples).items():
            span = slice(offset, offset + length)
            losses, counts = token_losses(outputs.logits[row, span], batch["labels"][row, span])
            packed_losses[index] = losses.sum() / counts.sum()
            total, count = total + losses.sum(), count + counts.sum()
            alone_loss = model(**alone(examples[index])).loss
            torch.testing.assert_close(packed_losses[index], alone_loss, atol=1e-5, rtol=1e-5, msg=f"example {index}")
    # the batch loss is the token-weighted mean of the sequences' losses: padding and boundaries add nothing
    torch.testing.assert_close(outputs.loss, total / count, atol=1e-6, rtol=1e-6)


def test_no_attention_crosses_a_boundary(media_config):
    model = build_model(media_config, "eager")
    examples = make_examples()
    batch = MultimodalPackingCollator(media_config, BUDGET)(examples)
    segment = torch.full((3, BUDGET), -1)  # the pad tails keep -1: a segment of their own
    for index, (row, offset, length) in sequence_spans(examples).items():
        segment[row, offset : offset + length] = index
    is_same_segment = segment[:, :, None] == segment[:, None, :]  # (rows, query, key)
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    for attention in attentions:  # (rows, heads, query, key)
        assert (attention.masked_select(~is_same_segment[:, None]) == 0).all()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_a_sequence_gets_no_gradient_from_its_neighbours(media_config, attn_implementation):
    """d(logits of one sequence) / d(decoder input of every other position of the row) is zero."""
    model = build_model(media_config, attn_implementation)
    examples = make_examples()
    batch = MultimodalPackingCollator(media_config, BUDGET)(examples)
    captured = []

    def make_leaf(module, args, kwargs):
        leaf = args[0].detach().requires_grad_()
        captured.append(leaf)
        return (leaf, *args[1:]), kwargs

    handle = model.model.layers[0].register_forward_pre_hook(make_leaf, with_kwargs=True)
    try:
        logits = model(**batch).logits
    finally:
        handle.remove()
    for index, (row, offset, length) in sequence_spans(examples).items():
        (gradient,) = torch.autograd.grad(logits[row, offset : offset + length].sum(), captured[0], retain_graph=True)
        inside = torch.zeros(3, BUDGET, dtype=torch.bool)
        inside[row, offset : offset + length] = True
        assert gradient[inside].abs().amax() > 1e-3  # the sequence does depend on itself
        # the gate's per-sequence running mean subtracts the row's earlier sums: exact in math, rounding in fp32
        assert gradient[~inside].abs().amax() <= 1e-6 * gradient[inside].abs().amax(), f"example {index}"


def test_pad_tokens_never_change_real_tokens(media_config):
    model = build_model(media_config, "sdpa")
    examples = make_examples()
    batch = MultimodalPackingCollator(media_config, BUDGET)(examples)
    other_padding = dict(batch, input_ids=batch["input_ids"].clone())
    is_pad = torch.ones(3, BUDGET, dtype=torch.bool)
    for row, offset, length in sequence_spans(examples).values():
        is_pad[row, offset : offset + length] = False
    other_padding["input_ids"][is_pad] = torch.randint(5, 96, (int(is_pad.sum()),))
    with torch.no_grad():
        reference, changed = model(**batch), model(**other_padding)
    torch.testing.assert_close(changed.logits[~is_pad], reference.logits[~is_pad], atol=0, rtol=0)
    torch.testing.assert_close(changed.loss, reference.loss, atol=0, rtol=0)


# --- Length-grouped sampling --------------------------------------------------------------------------------------


def test_length_grouped_sampler_is_seeded_and_groups_similar_lengths():
    lengths = torch.randint(5, 500, (400,), generator=torch.Generator().manual_seed(1)).tolist()
    first = list(length_grouped_sampler(lengths, batch_size=8, seed=3))
    assert sorted(first) == list(range(400))
    assert first == list(length_grouped_sampler(lengths, batch_size=8, seed=3))
    assert first != list(length_grouped_sampler(lengths, batch_size=8, seed=4))

    def mean_spread(order):
        batches = [order[i : i + 8] for i in range(0, len(order), 8)]
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    shuffled = torch.randperm(400, generator=torch.Generator().manual_seed(0)).tolist()
    assert mean_spread(first) < mean_spread(shuffled) / 5


# --- Trainer ------------------------------------------------------------------------------------------------------


def test_trainer_runs_with_the_packing_collator_and_length_grouping(media_config, tmp_path):
    model = build_model(media_config, "sdpa").train()
    examples = make_examples() * 4
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=2,
        per_device_train_batch_size=5,
        learning_rate=1e-2,
        train_sampling_strategy="group_by_length",
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=MultimodalPackingCollator(media_config, BUDGET, return_flash_attn_kwargs=True),
    )
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    changed = [name for name, param in model.named_parameters() if not torch.equal(param, before[name])]
    assert any("head_gate" in name for name in changed) and any("image_patch_embedding" in name for name in changed)
