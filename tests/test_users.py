"""The simulated users' judge and rewrite: the rule the loop's benchmark and quickstart score."""

import random

import pytest

from lmloop.loop import users
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


@pytest.mark.parametrize(
    "text,ok",
    [
        ("1. Lions hunt at night.\n2. Lions live in prides.\n3. Lions sleep a lot.", True),
        ("1) Lions hunt at night.\n\n2) Lions live in prides.\n3) Lions sleep a lot.", True),
        ("1. Lions hunt at night.\n2. Lions live in prides.", False),  # two points
        ("1. Lions hunt.\n2. Lions live in prides.\n3. Lions sleep a lot.", False),  # 2 words
        ("Here they are:\n1. Lions hunt at night.\n2. Lions live in prides.\n3. Lions sleep.",
         False),  # an intro line
        ("1. Lions hunt at night.\n3. Lions live in prides.\n2. Lions sleep a lot.", False),
        ("Lions hunt at night. Lions live in prides. Lions sleep a lot.", False),
    ],
)  # fmt: skip
def test_three_points_wants_exactly_three_numbered_lines(text, ok):
    assert users.is_three_points(text) is ok


@pytest.mark.parametrize(
    "text,ok",
    [
        ("Lions hunt at night and live in prides.", True),
        ("Lions are amazing!", False),
        ("I think lions hunt at night.", False),
        ("Let me explain: lions hunt at night.", False),
        ("In my view, lions hunt at night.", False),
        ("Lions live in Iowa zoos, Imagine that.", True),  # "I" only as a whole word
        ("", False),
    ],
)
def test_formal_means_no_exclamation_and_no_first_person(text, ok):
    assert users.is_formal(text) is ok


@pytest.mark.parametrize(
    "text,ok",
    [
        ("Lions hunt at night and live in prides. They sleep a lot.", True),
        ("Lions hunt at night.\n\nThey live in prides.", False),
        ("Lions:\n1. hunt\n2. sleep", False),
        ("Lions hunt at night and live in", True),  # cut off, still one paragraph
        ("  Lions hunt at night?  \n", True),
        ("Lions hunt.\nThey sleep.", False),
        ("", False),
    ],
)  # fmt: skip
def test_one_paragraph_means_no_line_break(text, ok):
    assert users.is_one_paragraph(text) is ok


@pytest.mark.parametrize("answer", ["", "Yes!", "Lions hunt. At night they roam far and wide."])
def test_three_points_rewrite_complies(answer):
    for seed in range(20):
        assert users.is_three_points(users.three_points(answer, "lions", random.Random(seed)))


def test_users_are_noisy_the_way_the_docstring_says():
    fam = users.FAMILIES["ask-back"]
    rng = random.Random(0)
    bad, good = "Lions hunt at night.", "Lions hunt at night. Have you seen one?"
    bodies = [users.judge(fam, bad, "lions", rng) for _ in range(4000)]
    ups = sum(b["thumb"] == "up" for b in bodies) / len(bodies)
    fixed = sum("correction" in b for b in bodies) / len(bodies)
    assert 0.08 < ups < 0.12  # 10% of thumbs flipped
    assert 0.66 < fixed < 0.74  # 70% of bad answers corrected, the rest only rated
    assert len({b["correction"] for b in bodies if "correction" in b}) > 20  # varied wording
    assert all(users.complies(b["correction"]) for b in bodies if "correction" in b)
    goods = [users.judge(fam, good, "lions", rng) for _ in range(1000)]
    assert not any("correction" in b for b in goods)
    for name in ("one-paragraph", "formal"):  # the thumbs-only families never correct
        thumbs_only = users.FAMILIES[name]
        assert not any("correction" in users.judge(thumbs_only, "Lions!\nI hunt", "lions", rng)
                       for _ in range(200))  # fmt: skip


def test_heldout_questions_use_forms_training_never_does():
    assert not set(users.TRAIN_FORMS) & set(users.HELDOUT_FORMS)
    train = {q for _, q in users.prompts(users.TRAIN_TOPICS, 0)}
    held = {q for _, q in users.prompts(users.HELDOUT_TOPICS, 1, users.HELDOUT_FORMS)}
    strip = lambda q, t: q.replace(t, "{}")  # noqa: E731
    train_forms = {strip(q, t) for t, q in users.prompts(users.TRAIN_TOPICS, 0)}
    held_forms = {
        strip(q, t) for t, q in users.prompts(users.HELDOUT_TOPICS, 1, users.HELDOUT_FORMS)
    }
    assert train and held and not train_forms & held_forms


def test_a_refused_question_is_one_line_naming_the_servers_reason():
    """A server that refuses the users' requests (here: answers longer than the model's
    context) stops the run with the server's own reason as a user error, not a traceback."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from lmloop.errors import UserError

    reason = "the prompt (31 tokens) and max_tokens (90) exceed the context (96 tokens)"

    class Refuse(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"error": {"message": reason, "type": "invalid_request_error"}})
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(UserError) as e:
            users.answer_all(url, "assistant", ["giraffes", "jazz"], max_tokens=90)
        assert (
            e.value.line() == f"the server refused a simulated user's question (HTTP 400): {reason}"
        )
    finally:
        server.shutdown()
