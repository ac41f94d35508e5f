"""Tests of deepseekv3.data.questions: the template table and the chat messages."""

from deepseekv3.data import DEFAULT_HELD_OUT_TEMPLATES, QUESTION_TEMPLATES, QUESTION_TYPES, build_messages


def test_every_template_has_a_known_type_and_single_word_answers():
    for name, template in QUESTION_TEMPLATES.items():
        assert template.name == name and template.question_type in QUESTION_TYPES
        assert template.modality in ("image", "audio")
        assert all(answer.isalpha() for answer in template.answers)
        assert len(set(template.answers)) == len(template.answers) >= 2
    assert {template.question_type for template in QUESTION_TEMPLATES.values()} == set(QUESTION_TYPES)
    assert set(DEFAULT_HELD_OUT_TEMPLATES) <= set(QUESTION_TEMPLATES)


def test_messages_follow_the_transformers_chat_convention():
    assert build_messages("how many tones are there?", "two", "audio") == [
        {
            "role": "user",
            "content": [{"type": "audio", "text": None}, {"type": "text", "text": "how many tones are there?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
    ]
