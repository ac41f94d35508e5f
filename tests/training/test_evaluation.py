"""Closed-set scoring: the most likely allowed answer wins, accuracy is exact match per question type; and free
generation: the reply to the question asked as a user asks it, exact match of the stripped reply.

The scoring cases are rigged so the right prediction is known without trusting the code under test: the tiny model's
logits are replaced (a forward hook on the real model) by a lookup that puts its probability on a chosen reply, or by
zeros (every token equally likely); a reference scores each candidate alone, encoded through the chat template, with
the model's own loss. The generation cases compare batched generation with a reference that asks one row at a time,
unpadded, as the demo does, on a random model and on one trained for a few steps (some replies right, some wrong,
some none of the allowed answers).
"""

import contextlib
import math
from collections import Counter

import pytest
import torch
from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS

from deepseekv3.configuration_deepseekv3 import DeepseekV3MultimodalConfig
from deepseekv3.data import QUESTION_TEMPLATES, build_multimodal_dataset, build_text_corpus
from deepseekv3.modeling_deepseekv3 import DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.processing_deepseekv3 import DeepseekV3MultimodalProcessor
from deepseekv3.tokenization import train_tokenizer
from deepseekv3.training.collators import InstructionCollator, conversation_with_media, encode_rows
from deepseekv3.training.evaluation import (
    chance_accuracy,
    evaluate_accuracy,
    evaluate_generated_accuracy,
    generate_answers,
    invalid_reply_rate,
    predict_answers,
    reply_accuracy,
)

NUM_IMAGES, NUM_CLIPS = 48, 24
# a small vocabulary splits the answers into 1 to 5 tokens, so candidates differ in length and some tie
VOCAB_SIZE = 290
# a logit this far above the rest leaves the other tokens about e^-50 of the probability
BOOST = 50.0


@pytest.fixture(scope="module")
def setup():
    """Tokenizer, tiny config, processor, and up to two rows of every question template with their encoded examples.

    The rows ask distinct questions, so their prompts differ (the lookup below tells rows apart by their prompt); the
    count templates have one question each, hence one row."""
    data = build_multimodal_dataset(NUM_IMAGES, NUM_CLIPS, seed=0, image_size=16, clip_seconds=0.3)["train"]
    tokenizer = train_tokenizer(build_text_corpus(NUM_IMAGES, NUM_CLIPS, 0), vocab_size=VOCAB_SIZE)
    # the tokenizer's special-token ids are the tiny config's (pad 0, bos 1, eos 2, image 3, audio 4)
    config = DeepseekV3MultimodalConfig(**{**TINY_TEXT_KWARGS, **TINY_MEDIA_KWARGS, "vocab_size": len(tokenizer)})
    processor = DeepseekV3MultimodalProcessor.from_config(config, tokenizer)
    picked, seen_questions = [], set()
    for template in QUESTION_TEMPLATES:
        matching = [row for row in data if row["question_template"] == template]
        for row in matching:
            if row["question"] not in seen_questions and sum(r["question_template"] == template for r in picked) < 2:
                seen_questions.add(row["question"])
                picked.append(row)
    examples = encode_rows(processor, picked, config.patch_size, progress=False)
    prompts = [tuple(example["input_ids"][: example["prompt_length"]].tolist()) for example in examples]
    assert len(set(prompts)) == len(prompts)
    return {"tokenizer": tokenizer, "config": config, "processor": processor, "rows": picked, "examples": examples}


def build_model(config: DeepseekV3MultimodalConfig) -> DeepseekV3MultimodalForConditionalGeneration:
    torch.manual_seed(0)
    return DeepseekV3MultimodalForConditionalGeneration(config).eval()


def reply_tokens(tokenizer, answer: str) -> list[int]:
    """The reply as the chat template ends an assistant turn: the answer, then `<|end|>`."""
    return [*tokenizer(answer, add_special_tokens=False)["input_ids"], tokenizer.convert_tokens_to_ids("<|end|>")]


def answer_with(model, replies: dict[tuple[int, ...], list[int]]):
    """Rig `model` to reply `replies[prompt]` after each prompt: the logits become a causal lookup that puts
    (nearly) all probability on the next token of that reply while the sequence still follows it, and spreads it
    evenly elsewhere. Returns the hook's handle."""

    def replace_logits(module, args, kwargs, output):
        logits = torch.zeros_like(output.logits)
        for row, ids in enumerate(kwargs["input_ids"].tolist()):
            prompt = next(prompt for prompt in replies if tuple(ids[: len(prompt)]) == prompt)
            reply = replies[prompt]
            for step, token in enumerate(reply):
                if ids[len(prompt) : len(prompt) + step] != reply[:step]:
                    break
                # (batch, seq_len, vocab): logits at position t predict the token at t + 1
                logits[row, len(prompt) + step - 1, token] = BOOST
        output.logits = logits
        return output

    return model.register_forward_hook(replace_logits, with_kwargs=True)


def rig_replies(setup, targets: list[str]) -> dict[tuple[int, ...], list[int]]:
    return {
        tuple(example["input_ids"][: example["prompt_length"]].tolist()): reply_tokens(setup["tokenizer"], target)
        for example, target in zip(setup["examples"], targets)
    }


def wrong_answer(row) -> str:
    answers = QUESTION_TEMPLATES[row["question_template"]].answers
    return answers[(answers.index(row["answer"]) + 1) % len(answers)]


@pytest.mark.parametrize("batch_size", [3, 14])
def test_the_answer_the_model_makes_most_likely_wins_in_every_row(setup, batch_size):
    rows = setup["rows"]
    # every other row gets a wrong answer, so the rows of one batch (3 or 4 candidates each) want different choices
    targets = [row["answer"] if index % 2 else wrong_answer(row) for index, row in enumerate(rows)]
    model = build_model(setup["config"])
    with_hook = answer_with(model, rig_replies(setup, targets))
    predictions = predict_answers(
        model, setup["processor"], rows, setup["examples"], batch_size=batch_size, progress=False
    )
    with_hook.remove()
    assert predictions == targets


def test_accuracy_is_exact_match_per_question_type(setup):
    rows = setup["rows"]
    # template: (its rows, how many of them the rigged model answers right)
    right = {
        "color": (2, 2),
        "color_by_side": (2, 1),  # a colour question: counts under "color"
        "shape": (2, 0),
        "count": (1, 1),
        "spatial": (2, 1),
        "audio_pitch": (2, 2),
        "audio_count": (1, 0),
        "audio_order": (2, 1),
    }
    assert Counter(row["question_template"] for row in rows) == {name: count for name, (count, _) in right.items()}
    seen = dict.fromkeys(right, 0)
    targets = []
    for row in rows:
        template = row["question_template"]
        targets.append(row["answer"] if seen[template] < right[template][1] else wrong_answer(row))
        seen[template] += 1
    model = build_model(setup["config"])
    with_hook = answer_with(model, rig_replies(setup, targets))
    accuracy = evaluate_accuracy(model, setup["processor"], rows, setup["examples"], batch_size=5, progress=False)
    with_hook.remove()
    assert accuracy == {"audio": 3 / 5, "color": 3 / 4, "count": 1.0, "shape": 0.0, "spatial": 0.5}
    assert list(accuracy) == sorted(accuracy)


def test_under_equal_token_probabilities_the_fewest_reply_tokens_win_and_ties_go_to_the_earlier_answer(setup):
    """With every token equally likely a reply of n tokens has likelihood (1 / vocab_size)^n: the reply's log-
    probabilities are summed, not averaged (a mean would tie every candidate), and among equally short replies the
    answer listed first wins."""
    tokenizer, rows = setup["tokenizer"], setup["rows"]

    def length(answer):
        return len(reply_tokens(tokenizer, answer))

    expected = [min(QUESTION_TEMPLATES[row["question_template"]].answers, key=length) for row in rows]
    # the case is informative: some template's shortest answer is not its first, and some template has a tie
    answer_sets = [template.answers for template in QUESTION_TEMPLATES.values()]
    assert any(min(answers, key=length) != answers[0] for answers in answer_sets)
    assert any([length(answer) for answer in answers].count(min(map(length, answers))) > 1 for answers in answer_sets)
    model = build_model(setup["config"])
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: a uniform next-token distribution at every position
    predictions = predict_answers(model, setup["processor"], rows, setup["examples"], batch_size=4, progress=False)
    assert predictions == expected


def test_predictions_are_the_answers_of_highest_reply_log_likelihood_scored_one_at_a_time(setup):
    """Reference: each candidate answer written into the row's conversation, encoded through the chat template alone
    and scored with the model's own loss (mean over the reply's tokens, times their number). Checks that the
    candidates keep the prompt's media and that the answers are tokenized as the chat template does."""
    rows, examples, processor = setup["rows"], setup["examples"], setup["processor"]
    model = build_model(setup["config"])
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # spread the scores well beyond float32 noise
    collator = InstructionCollator(setup["config"])
    answered = []  # (row index, the row with one of its allowed answers as the assistant's reply)
    for index, row in enumerate(rows):
        for answer in QUESTION_TEMPLATES[row["question_template"]].answers:
            messages = [*row["messages"][:-1], {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
            answered.append((index, {**row, "messages": messages}))
    encoded = encode_rows(processor, [row for _, row in answered], model.config.patch_size, progress=False)
    scores = [[] for _ in rows]  # per row, per answer in the template's order
    for (index, _), example in zip(answered, encoded):
        batch = collator([example])
        num_reply_tokens = int((batch["labels"] != -100).sum())
        with torch.no_grad():
            scores[index].append(-model(**batch).loss.item() * num_reply_tokens)
    expected, margins = [], []
    for row, row_scores in zip(rows, scores):
        ranked = sorted(row_scores, reverse=True)
        margins.append(ranked[0] - ranked[1])
        expected.append(QUESTION_TEMPLATES[row["question_template"]].answers[row_scores.index(ranked[0])])
    assert min(margins) > 1e-3  # no near-tie that float noise could flip
    assert len(set(expected)) > 3  # the random model's choices vary from row to row
    for batch_size in (1, len(rows)):
        assert predict_answers(model, processor, rows, examples, batch_size=batch_size, progress=False) == expected


def test_scoring_leaves_the_model_in_the_mode_it_found(setup):
    rows, examples = setup["rows"][:2], setup["examples"][:2]
    model = build_model(setup["config"])
    for training in (True, False):
        model.train(training)
        predict_answers(model, setup["processor"], rows, examples, progress=False)
        assert model.training is training


def test_chance_accuracy_averages_one_over_the_number_of_answers_per_question_type():
    rows = [
        {"question_type": "color", "question_template": "color"},  # 4 answers
        {"question_type": "color", "question_template": "color_by_side"},  # 4 answers
        {"question_type": "audio", "question_template": "audio_pitch"},  # 3 answers
        {"question_type": "audio", "question_template": "audio_order"},  # 3 answers
        {"question_type": "spatial", "question_template": "spatial"},  # 4 answers
        {"question_type": "count", "question_template": "count"},  # 3 answers
    ]
    chance = chance_accuracy(rows)
    assert list(chance) == ["audio", "color", "count", "spatial"]
    for question_type, value in {"audio": 1 / 3, "color": 1 / 4, "count": 1 / 3, "spatial": 1 / 4}.items():
        assert math.isclose(chance[question_type], value)


def test_rows_and_examples_of_different_lengths_are_refused(setup):
    rows, examples = setup["rows"][:3], setup["examples"][:2]
    model = build_model(setup["config"])
    for scorer in (predict_answers, evaluate_accuracy):
        with pytest.raises(ValueError, match=r"rows \(3\) and examples \(2\)"):
            scorer(model, setup["processor"], rows, examples, progress=False)
        with pytest.raises(ValueError, match=r"rows \(2\) and examples \(3\)"):
            scorer(model, setup["processor"], setup["rows"][:2], setup["examples"][:3], progress=False)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_a_batch_size_below_one_is_refused(setup, batch_size):
    model = build_model(setup["config"])
    with pytest.raises(ValueError, match=rf"batch_size \({batch_size}\) must be at least 1"):
        predict_answers(model, setup["processor"], setup["rows"][:2], setup["examples"][:2], batch_size=batch_size)


def test_an_unknown_question_template_is_refused(setup):
    rows = [{**setup["rows"][0], "question_template": "colour"}]
    model = build_model(setup["config"])
    with pytest.raises(ValueError, match=r"question_template \('colour'\) of row 0 is not one of"):
        predict_answers(model, setup["processor"], rows, setup["examples"][:1], progress=False)
    with pytest.raises(ValueError, match=r"question_template \('colour'\) of row 0 is not one of"):
        chance_accuracy(rows)


def test_an_answer_outside_the_templates_answers_is_refused(setup):
    """Such a row could never be scored right: its accuracy would be silently wrong."""
    rows = [setup["rows"][0], {**setup["rows"][1], "answer": "purple"}]
    model = build_model(setup["config"])
    with pytest.raises(ValueError, match=r"answer \('purple'\) of row 1 is not among the answers"):
        evaluate_accuracy(model, setup["processor"], rows, setup["examples"][:2], progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# Generation


@contextlib.contextmanager
def one_torch_thread():
    """Measured: the tiny model's small matrices train and generate several times faster on one thread than on
    two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def generators(setup):
    """Two models with every feature on (head gates, image position values): random weights (logits scaled up so
    greedy choices are far from ties), and the same trained 40 steps on the setup rows (replies of allowed words,
    some right). Both stop at the chat template's end of turn, as the demo model does."""
    tokenizer = setup["tokenizer"]
    config = DeepseekV3MultimodalConfig(
        **{**TINY_TEXT_KWARGS, **TINY_MEDIA_KWARGS, "vocab_size": len(tokenizer)},
        use_attention_gate=True,
        use_image_position_values=True,
    )
    models = {}
    for name in ("random", "trained"):
        torch.manual_seed(0)
        model = DeepseekV3MultimodalForConditionalGeneration(config)
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]
        if name == "random":
            with torch.no_grad():
                model.lm_head.weight.mul_(20.0)
        else:
            batch = InstructionCollator(config)(setup["examples"])
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            with one_torch_thread():
                for _ in range(40):
                    model(**batch).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
        models[name] = model.eval()
    return models


def generate_one_at_a_time(model, processor, rows, max_new_tokens=8):
    """The reference: each row alone, unpadded, as the demo asks a question; also the smallest gap between the
    chosen token's score and the next best over every generated step."""
    replies, gaps = [], []
    for row in rows:
        inputs = processor.apply_chat_template(
            [conversation_with_media(row, include_answer=False)],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            processor_kwargs={"return_tensors": "pt", "sampling_rate": 16000},
        )
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
        new_tokens = output.sequences[0, inputs["input_ids"].shape[1] :]
        replies.append(processor.decode(new_tokens, skip_special_tokens=True).strip())
        gaps += [float(torch.topk(scores[0], 2).values.diff().abs()) for scores in output.scores]
    return replies, min(gaps)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["random", "trained"])
def test_batched_generation_gives_the_replies_of_one_row_at_a_time(setup, generators, name):
    """Image and audio rows in one batch, prompts of different lengths (left padding puts every prompt's end where
    generation starts); the trained model's replies stop at the end of turn after a few tokens."""
    rows, processor, model = setup["rows"], setup["processor"], generators[name]
    assert {row["modality"] for row in rows[:3]} == {"image"} and {row["modality"] for row in rows[-3:]} == {"audio"}
    assert len({len(example["input_ids"]) for example in setup["examples"]}) > 3
    expected, smallest_gap = generate_one_at_a_time(model, processor, rows)
    assert smallest_gap > 1e-3  # no near-tie that float noise could flip
    assert len(set(expected)) > 3
    for batch_size in (len(rows), 5):  # 5: mixed image and audio batches, the last one shorter
        assert generate_answers(model, processor, rows, batch_size=batch_size, progress=False) == expected


@pytest.mark.usefixtures("one_thread")
def test_generated_accuracy_is_exact_match_of_the_replies_per_question_type(setup, generators):
    rows, processor, model = setup["rows"], setup["processor"], generators["trained"]
    replies = generate_answers(model, processor, rows, batch_size=4, progress=False)
    right, total = Counter(), Counter()
    for row, reply in zip(rows, replies):
        total[row["question_type"]] += 1
        right[row["question_type"]] += reply == row["answer"]
    expected = {question_type: right[question_type] / total[question_type] for question_type in sorted(total)}
    # informative: some replies right, some wrong, some none of the allowed answers
    assert 0 < sum(right.values()) < len(rows)
    allowed = [reply in QUESTION_TEMPLATES[row["question_template"]].answers for row, reply in zip(rows, replies)]
    assert 0 < sum(allowed) < len(rows)
    assert evaluate_generated_accuracy(model, processor, rows, batch_size=4, progress=False) == expected
    assert reply_accuracy(rows, replies) == expected
    invalid = Counter(row["question_type"] for row, ok in zip(rows, allowed) if not ok)
    assert invalid_reply_rate(rows, replies) == {
        question_type: invalid[question_type] / total[question_type] for question_type in sorted(total)
    }


def test_replies_are_compared_exactly_and_words_outside_the_answers_are_invalid():
    rows = [
        {"question_type": "color", "question_template": "color", "answer": "red"},
        {"question_type": "color", "question_template": "color_by_side", "answer": "blue"},
        {"question_type": "color", "question_template": "color", "answer": "green"},
        {"question_type": "color", "question_template": "color", "answer": "yellow"},
        {"question_type": "count", "question_template": "count", "answer": "two"},
        {"question_type": "count", "question_template": "count", "answer": "one"},
    ]
    # right; an allowed but wrong answer; case, whitespace and punctuation count; an empty reply
    replies = ["red", "green", "Green", "yellow.", "two", ""]
    assert reply_accuracy(rows, replies) == {"color": 1 / 4, "count": 1 / 2}
    assert invalid_reply_rate(rows, replies) == {"color": 2 / 4, "count": 1 / 2}


def test_no_rows_give_no_replies(setup, generators):
    model, processor = generators["random"], setup["processor"]
    assert generate_answers(model, processor, [], progress=False) == []
    assert evaluate_generated_accuracy(model, processor, [], progress=False) == {}


@pytest.mark.usefixtures("one_thread")
def test_generation_leaves_the_model_in_the_mode_it_found_even_when_a_row_fails(setup, generators):
    rows, processor, model = setup["rows"], setup["processor"], generators["random"]
    # the second batch holds an image row whose image is missing
    broken = [*rows[:3], {**rows[0], "image": None}]
    for training in (True, False):
        model.train(training)
        generate_answers(model, processor, rows[:2], max_new_tokens=2, progress=False)
        assert model.training is training
        with pytest.raises(ValueError, match=r"row 3 \('color'\) shows an image but its 'image' is missing"):
            generate_answers(model, processor, broken, batch_size=3, max_new_tokens=2, progress=False)
        assert model.training is training
    model.eval()


@pytest.mark.parametrize(("keyword", "value"), [("batch_size", 0), ("max_new_tokens", 0), ("max_new_tokens", -1)])
def test_generation_settings_below_one_are_refused(setup, generators, keyword, value):
    with pytest.raises(ValueError, match=rf"{keyword} \({value}\) must be at least 1"):
        generate_answers(generators["random"], setup["processor"], setup["rows"][:1], **{keyword: value})


def test_bad_rows_and_replies_are_refused_before_generating(setup, generators):
    rows, processor, model = setup["rows"], setup["processor"], generators["random"]
    unknown = [rows[0], {**rows[1], "question_template": "colour"}]
    for function in (generate_answers, evaluate_generated_accuracy):
        with pytest.raises(ValueError, match=r"question_template \('colour'\) of row 1 is not one of"):
            function(model, processor, unknown, progress=False)
    with pytest.raises(ValueError, match=r"answer \('purple'\) of row 1 is not among the answers"):
        evaluate_generated_accuracy(model, processor, [rows[0], {**rows[1], "answer": "purple"}], progress=False)
    audio = [row for row in rows if row["modality"] == "audio"][:2]
    resampled = [audio[0], {**audio[1], "audio": {**audio[1]["audio"], "sampling_rate": 8000}}]
    with pytest.raises(ValueError, match=r"different sampling rates \[8000, 16000\]"):
        generate_answers(model, processor, resampled, progress=False)
    for function in (reply_accuracy, invalid_reply_rate):
        with pytest.raises(ValueError, match=r"rows \(2\) and replies \(1\) must be as many"):
            function(rows[:2], ["red"])
