"""The simulated users' judge and rewrite: the rule the loop's benchmark and quickstart score."""

import random

import pytest

from lmloop.loop.users import complies, rewrite, sentences


@pytest.mark.parametrize(
    "text,ok",
    [
        ("Penguins are birds that cannot fly. Have you ever seen penguins yourself?", True),
        ("Volcanoes erupt molten rock!  What made you curious about volcanoes?", True),
        ("What's a penguin?", False),  # a question back with no answer
        ("Good question. What else?", False),  # a two-word "answer"
        ("Penguins are birds that cannot fly.", False),  # no question back
        ("Penguins are birds. They swim well. Shall I tell you more?", False),  # three sentences
        ("What are penguins? Which part of penguins interests you most?", False),
        ("", False),
    ],
)
def test_complies_wants_an_answer_then_a_question(text, ok):
    assert complies(text) is ok


def test_sentences_split_after_end_marks_only():
    assert sentences("It is 3.5 m tall. Really?  Yes") == ["It is 3.5 m tall.", "Really?", "Yes"]


@pytest.mark.parametrize(
    "answer",
    [
        "The moon orbits the Earth every 27 days, and it has no air, and it has craters, and "
        "it pulls the tides, and it was visited by astronauts in 1969 and again later on. More.",
        "Dr. Smith studied bees. They dance.",
        "Yes!",
        "",
        "What a wonderful question? It is.",
    ],
)
def test_rewrite_always_complies_and_keeps_the_first_sentence(answer):
    fixed = rewrite(answer, "the moon", random.Random(0))
    assert complies(fixed), fixed
    first = sentences(answer)[0] if answer else ""
    if len(first.split()) >= 4:
        assert fixed.startswith(" ".join(first.rstrip("?!.").split()[:25]))
