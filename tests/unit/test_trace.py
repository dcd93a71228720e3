"""Causal tracing on tiny models of every architecture: the restorations, hook hygiene, the AIE cache."""

import pytest
import torch

from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.trace import runs as R
from rankone.trace import tracing as T
from rankone.trace.runs import TraceSettings, trace_case, window_layers
from rankone.trace.tracing import average_indirect_effect, cached_aie
from tiny import BOS_ARCHS, CONFIGS, make_model
from conftest import handle_of  # noqa: E402

PROMPT, SUBJECT = "The home of {} is", "Danielle Darrieux"
FAST = TraceSettings(n_samples=3)
PEAKED = dict(initializer_range=0.5)  # larger random weights: a peaked next-token distribution


def tok_for(model_type, tok, tok_bos):
    return tok_bos if model_type in BOS_ARCHS else tok


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_zero_noise_every_restoration_gives_the_clean_probability(model_type, tok, tok_bos):
    model = make_model(model_type, **PEAKED)
    t = tok_for(model_type, tok, tok_bos)
    tr = trace_case(handle_of(model, t), PROMPT, SUBJECT, None, 0.0, FAST)
    assert tr.correct and len(tr.positions) == len(tr.tokens)
    assert tr.p_clean > 0.05
    assert tr.p_corrupted == pytest.approx(tr.p_clean, rel=1e-4)
    for kind in R.KINDS:
        s = torch.tensor(tr.scores[kind])
        assert s.shape == (len(tr.tokens), handle_of(model, None).n_layers)
        assert torch.allclose(s, torch.full_like(s, tr.p_clean), rtol=1e-4, atol=0), (kind, s, tr.p_clean)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "opt", "gpt_neox", "falcon"])
def test_noise_corrupts_and_restorations_act_where_they_should(model_type, tok, tok_bos):
    model = make_model(model_type, **PEAKED)
    t = tok_for(model_type, tok, tok_bos)
    tr = trace_case(handle_of(model, t), PROMPT, SUBJECT, None, 1.5, FAST)
    first, last = tr.subject_range
    n_layers = handle_of(model, None).n_layers
    assert abs(tr.p_corrupted - tr.p_clean) > 0.2 * tr.p_clean  # the noise reached the subject's embeddings
    hidden = torch.tensor(tr.scores["hidden"])
    # The last block's output at the last token fixes the logits: restoring it restores p_clean.
    assert hidden[-1, n_layers - 1].item() == pytest.approx(tr.p_clean, rel=1e-4)
    # Tokens before the subject never see the noise (causal attention): restoring them does nothing.
    for kind in R.KINDS:
        before = torch.tensor(tr.scores[kind])[:first]
        assert first > 0 and torch.allclose(before, torch.full_like(before, tr.p_corrupted), rtol=1e-4, atol=0)


def test_hooks_leave_the_model_unchanged_also_after_an_exception(tok):
    model = make_model("gpt2", **PEAKED)
    model.train()  # dropout must be off while tracing and the mode given back afterwards
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = trace_case(handle_of(model, tok), PROMPT, SUBJECT, None, 1.0, FAST)
    assert tr.correct and model.training

    def boom(i, n):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        trace_case(handle_of(model, tok), PROMPT, SUBJECT, None, 1.0, FAST, on_chunk=boom)
    assert model.training
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, m
        assert "forward" not in m.__dict__
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # seeded noise: the same trace again, bit for bit
    assert trace_case(handle_of(model, tok), PROMPT, SUBJECT, None, 1.0, FAST).scores == tr.scores


def test_wrong_answer_is_reported_not_traced(tok):
    model = make_model("gpt2", **PEAKED)
    tr = trace_case(handle_of(model, tok), PROMPT, SUBJECT, None, 1.0, FAST)
    wrong = next(w for w in (" Paris", " Rome", " London") if w.strip() != tr.answer_token.strip())
    out = trace_case(handle_of(model, tok), PROMPT, SUBJECT, wrong.strip(), 1.0, FAST)
    assert not out.correct and out.scores == {} and out.predicted != out.answer_token and out.p_corrupted == 0.0


def test_window_follows_the_paper():
    assert R.default_window(4) == 1 and R.default_window(12) == 3 and R.default_window(48) == 10
    assert window_layers(0, 10, 48) == [0, 1, 2, 3, 4]
    assert window_layers(20, 10, 48) == list(range(15, 25))
    assert window_layers(47, 10, 48) == list(range(42, 48))
    assert window_layers(2, 1, 4) == [2]


def test_settings_round_trip_and_refuse_bad_values():
    s = TraceSettings(n_samples=4, window=2, kinds=["mlp"], noise_scale=0.5)
    assert TraceSettings.from_dict(s.to_dict()) == s
    for bad, msg in [(dict(n_samples=0), "noise samples"), (dict(window=0), "window"),
                     (dict(kinds=["mlpp"]), "unknown trace kind"), (dict(noise_factor=-1), "noise level")]:
        with pytest.raises(RankoneError, match=msg):
            TraceSettings(**bad)


def test_aie_is_zero_without_noise_and_cached_per_model(tok, monkeypatch):
    model = make_model("gpt2", **PEAKED)
    facts = [(PROMPT, SUBJECT, None), ("{} was born in", "Toko Yasuda", None)]
    s = TraceSettings(n_samples=2, noise_scale=0.0)
    a = average_indirect_effect(handle_of(model, tok), facts, 0.0, s)
    assert a.n_facts == 2 and a.ate == pytest.approx(0, abs=1e-6)
    assert a.p_clean > 0.05 and all(abs(v) < 1e-4 * a.p_clean for vs in a.aie.values() for v in vs)

    s = TraceSettings(n_samples=2)
    first = cached_aie(handle_of(model, tok), facts, s, [SUBJECT, "Toko Yasuda"], source="test")
    assert first.cache_file and len(first.aie["mlp"]) == 3 and first.n_facts == 2
    calls = []
    real = T.average_indirect_effect
    monkeypatch.setattr(T, "average_indirect_effect", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = cached_aie(handle_of(model, tok), facts, s, [SUBJECT, "Toko Yasuda"], source="test")
    assert calls == [] and second.aie == first.aie and second.cache_file == first.cache_file
    assert T.best_cached_aie(T.model_fingerprint(model)).aie == first.aie
    with torch.no_grad():  # an edited model is another model: its AIE is not taken from the cache
        model.transformer.h[0].mlp.c_proj.weight.add_(0.01)
    third = cached_aie(handle_of(model, tok), facts, s, [SUBJECT, "Toko Yasuda"], source="test")
    assert calls == [1] and third.cache_file != first.cache_file


def test_an_unalignable_fact_is_skipped_not_fatal(tok):
    # a long AIE run over a case file must not end on one fact whose subject sits inside a token
    model = make_model("gpt2")
    word = next(w for w in ("king", "the", "and") if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1)
    facts = [T.SubjectPrompt("{} is in", "Paris", None), T.SubjectPrompt(f"My {word} is", word[:-1], None)]
    aie = T.average_indirect_effect(handle_of(model, tok), facts, 0.1, T.TraceSettings(kinds=["mlp"], n_samples=2))
    assert aie.n_facts + aie.n_wrong == 1 and len(aie.skipped) == 1
    assert "token" in aie.skipped[0]["why"] and aie.skipped[0]["subject"] == word[:-1]
