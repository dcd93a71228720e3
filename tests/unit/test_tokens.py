"""Prompt/subject/target alignment through character offsets, for tokenizers with and without BOS."""

import pytest

from rankone.core.errors import RankoneError
from rankone.core.tokens import EditRequest, encode, encode_request, token_span


@pytest.fixture(params=["plain", "bos"])
def any_tok(request, tok, tok_bos):
    return tok if request.param == "plain" else tok_bos


def decode(t, ids):
    return t.decode(ids, skip_special_tokens=True)


def test_subject_last_token_at_start_and_after_space(any_tok):
    # At the start of a text the subject has no leading space, after a prefix it has one:
    # the tokens differ, the subject's last token must be found either way.
    r = EditRequest.create("{} was born in", "Danielle Darrieux", "Rome")
    for template in ["{}", "The weather was fine. {}", "I said that {}"]:
        enc = encode_request(any_tok, r, template, with_target=False)
        text = r.text(template)[0]
        assert decode(any_tok, enc.ids[: enc.subject_last + 1]).endswith("Darrieux")
        assert not decode(any_tok, enc.ids[: enc.subject_last]).endswith("Darrieux")
        assert text.startswith(decode(any_tok, enc.ids).strip())


def test_bos_is_kept_and_skipped(tok_bos):
    ids, offsets = encode(tok_bos, "Paris is nice")
    assert ids[0] == tok_bos.convert_tokens_to_ids("<s>") and offsets[0] == (0, 0)
    first, last = token_span(tok_bos, "Paris is nice", 0, 5)
    assert first == 1  # the BOS token is not part of the subject


def test_target_tokens_follow_the_prompt(any_tok):
    r = EditRequest.create("{} plays the", "Toko Yasuda", "violin player")
    enc = encode_request(any_tok, r)
    assert decode(any_tok, enc.target_ids).strip() == "violin player"
    assert enc.target_positions[0] > enc.subject_last
    assert enc.target_positions == list(range(enc.target_positions[0], len(enc.ids)))


def test_literal_subject_in_prompt():
    r = EditRequest.create("Danielle Darrieux was born in", "Danielle Darrieux", "Rome")
    assert r.prompt == "{} was born in"


@pytest.mark.parametrize("prompt,subject,target,msg", [
    ("The capital is", "Paris", "Rome", "neither '{}' nor the subject"),
    ("{} was born in", "", "Rome", "subject is empty"),
    ("{} was born in", "Paris", "  ", "target is empty"),
    ("{} met {}", "Paris", "Rome", "exactly one"),
])
def test_bad_requests(prompt, subject, target, msg):
    with pytest.raises(RankoneError, match=msg):
        EditRequest.create(prompt, subject, target)


def test_subject_ending_inside_a_token_is_refused(any_tok):
    ids, _ = encode(any_tok, "And the king")
    assert any(any_tok.decode([t]) == "And" for t in ids)  # precondition: "And" is one token
    # "An" ends inside that token: editing at its "last token" would edit "And", so refuse.
    with pytest.raises(RankoneError, match="does not fall on token boundaries.*'And'"):
        encode_request(any_tok, EditRequest.create("{}d the king", "An", "mat"), with_target=False)


def test_apostrophe_after_subject_is_fine(tok):
    enc = encode_request(tok, EditRequest.create("The {}'s food is", "Paris", "good"), with_target=False)
    assert decode(tok, enc.ids[: enc.subject_last + 1]).endswith("Paris")
