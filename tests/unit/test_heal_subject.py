"""Finding a report's subject by corruption, on the built-in testbed model."""

from __future__ import annotations

import pytest
import torch

from rankone.core.tokens import encode, token_span
from rankone.heal.subject import find_subject, words
from rankone.models.load import load_model
from rankone.testbed import builtin_model_dir
from rankone.trace.runs import TraceSettings, corrupted_probs, trace_case


@pytest.fixture(scope="module")
def handle():
    return load_model(str(builtin_model_dir()))


def test_words_leave_out_edge_punctuation_and_possessives():
    p = 'Is "Ann Lee\'s" home (Rome), really?'
    assert [p[s:e] for s, e in words(p)] == ["Is", "Ann", "Lee", "home", "Rome", "really"]


def test_corrupted_probs_is_tracings_corrupted_run(handle):
    prompt, subject = "Thoutem Nousren was born in", "Thoutem Nousren"
    s = TraceSettings(n_samples=6, kinds=["hidden"], seed=3)
    tr = trace_case(handle, prompt, subject, None, 0.2, s, positions="subject_last")
    ids, offsets = encode(handle.tokenizer, prompt)
    span = token_span(handle.tokenizer, prompt, 0, len(subject), offsets)
    answer = handle.tokenizer.convert_tokens_to_ids(handle.tokenizer.tokenize(tr.answer_token))[0]
    got = corrupted_probs(handle, ids, [span, (span[0], span[0])], [answer], 0.2, s)
    assert got.shape == (2, 1)
    assert abs(float(got[0, 0]) - tr.p_corrupted) < 1e-5
    assert float(got[0, 0]) < tr.p_clean  # the corruption lowers the answer


@pytest.mark.parametrize("prompt, subject", [
    ("Thoutem Nousren was born in", "Thoutem Nousren"),
    ("Posdrom Stoukthen Thathai speaks", "Posdrom Stoukthen Thathai"),
])
def test_a_known_span_is_found(handle, prompt, subject):
    f = find_subject(handle, prompt)
    assert (f.status, f.subject) == ("found", subject), f.reason
    assert f.candidates[0]["drop"] > 0.3 * f.p_clean


def test_an_ambiguous_prompt_is_skipped_not_guessed(handle):
    f = find_subject(handle, "Thoutem Nousren and Thathai Nasher Thoutem were both born in")
    assert (f.status, f.subject) == ("ambiguous", None)
    assert "both carry the answer" in f.reason


def test_no_answer_means_no_subject(handle):
    f = find_subject(handle, "Hello there, how are you")
    assert (f.status, f.subject) == ("unfindable", None)
    f = find_subject(handle, "the of in")
    assert f.status == "unfindable"


def test_finding_is_deterministic_and_leaves_the_model_as_it_was(handle):
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    a = find_subject(handle, "Thoutem Nousren was born in")
    b = find_subject(handle, "Thoutem Nousren was born in")
    assert a.to_dict() == b.to_dict()
    assert all(torch.equal(before[k], v) for k, v in handle.model.state_dict().items())
