"""What an edit computes once per model is kept on disk: context templates and a statistics
corpus sampled from the model itself, each keyed by the model's fingerprint and seed."""

import json
import logging

import pytest
import torch

from rankone.core.tokens import EditRequest, sample_prefixes
from rankone.edit.editor import Editor
from rankone.methods import corpus as corpus_mod
from rankone.methods.corpus import sampled_corpus
from rankone.methods.rome import EditHParams
from tiny import make_model
from conftest import handle_of  # noqa: E402

SPEC = [[4, 5], [6, 5]]
REQ = EditRequest.create("{} was born in", "Danielle Darrieux", "Rome")


def test_cached_templates_equal_freshly_sampled_ones(tok, corpus, tmp_path, monkeypatch):
    model = make_model("gpt2")
    hp = EditHParams(prefix_spec=SPEC, seed=3)
    first = Editor(handle_of(model, tok), hp, corpus, cache_dir=tmp_path, progress=False).templates
    assert len(list((tmp_path / "templates").glob("*.json"))) == 1
    # a second editor (a second process) reads them from disk and samples nothing
    monkeypatch.setattr("rankone.edit.context.sample_prefixes", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    again = Editor(handle_of(model, tok), hp, corpus, cache_dir=tmp_path, progress=False).templates
    assert again == first
    assert first == ["{}"] + sample_prefixes(model, tok, SPEC, 3)  # the same as sampling afresh
    assert first[1:] != sample_prefixes(model, tok, SPEC, 4)  # and the seed matters


def test_templates_have_romes_lengths_and_cache_follows_the_model(tok, tok_bos, corpus, tmp_path, monkeypatch):
    from rankone.core import tokens

    model = make_model("gpt2")
    seen = []
    real = tokens.sample_tokens
    monkeypatch.setattr(tokens, "sample_tokens", lambda m, ids, n, *a: seen.append(real(m, ids, n, *a).shape) or real(m, ids, n, *a))
    sample_prefixes(model, tok, [[4, 5]], 0, starts=("The",))
    sample_prefixes(model, tok_bos, [[4, 5]], 0, starts=("The",))
    # (length 4) counts every token, the starter word and a BOS included, as ROME's generate_fast
    assert seen == [torch.Size([5, 4]), torch.Size([5, 4])]
    monkeypatch.undo()
    a = Editor(handle_of(model, tok), EditHParams(prefix_spec=SPEC), corpus, cache_dir=tmp_path, progress=False).templates
    with torch.no_grad():
        model.transformer.h[2].mlp.c_fc.weight.add_(0.5)  # another model: its own templates
    b = Editor(handle_of(model, tok), EditHParams(prefix_spec=SPEC), corpus, cache_dir=tmp_path, progress=False).templates
    files = sorted((tmp_path / "templates").glob("*.json"))
    assert len(files) == 2 and len(a) == len(b)  # sampled again for the changed model, kept apart


def test_sampled_corpus_is_deterministic_per_seed_and_cached(tok, tmp_path, monkeypatch):
    model = make_model("gpt2")
    f = sampled_corpus(model, tok, n_tokens=300, seed=1, length=25, batch=4, cache_dir=tmp_path, progress=False)
    text = f.read_text()
    docs = [json.loads(line)["text"] for line in text.splitlines()]
    assert len(docs) == 12 and all(docs)
    f.unlink()
    f.with_suffix(".json").unlink()
    assert sampled_corpus(model, tok, 300, 1, 25, 4, tmp_path, False).read_text() == text  # same seed, same text
    other = sampled_corpus(model, tok, 300, 2, 25, 4, tmp_path, False)
    assert other != f and other.read_text() != text
    # cached: a second call samples nothing
    monkeypatch.setattr(corpus_mod, "_sample_documents", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert sampled_corpus(model, tok, 300, 1, 25, 4, tmp_path, False).read_text() == text
    # a tampered file is not trusted
    f.write_text(text.replace("a", "b", 1) if "a" in text else text + "\n")
    monkeypatch.undo()
    assert sampled_corpus(model, tok, 300, 1, 25, 4, tmp_path, False).read_text() == text


def test_an_interrupted_sampled_corpus_resumes_to_the_same_text(tok, tmp_path, monkeypatch):
    model = make_model("gpt2")
    want = sampled_corpus(model, tok, 300, 1, 25, 4, tmp_path / "whole", False).read_text()
    real, calls = corpus_mod.sample_tokens, []

    def stop_at_third(*a, **k):  # the third batch is interrupted: two are checkpointed
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(corpus_mod, "sample_tokens", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        sampled_corpus(model, tok, 300, 1, 25, 4, tmp_path / "cut", False)
    partial = next((tmp_path / "cut" / "corpus").glob("*.partial.jsonl"))
    assert len(partial.read_text().splitlines()) == 8  # two batches of four documents
    with open(partial, "a") as fh:  # a batch half-written when it stopped is cut off
        fh.write('{"text": "half')
    calls.clear()
    monkeypatch.setattr(corpus_mod, "sample_tokens", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    f = sampled_corpus(model, tok, 300, 1, 25, 4, tmp_path / "cut", False)
    assert f.read_text() == want and len(calls) == 1  # only the third batch was sampled again
    assert not list((tmp_path / "cut" / "corpus").glob("*.partial*"))


def test_editor_without_a_corpus_samples_one_says_so_and_records_it(tok, tmp_path, caplog):
    model = make_model("gpt2")  # built in memory: no folder, no corpus.txt
    hp = EditHParams(v_steps=3, prefix_spec=[[3, 5]], layer=1, sampled_corpus_tokens=2000, stats_tokens=2000)
    with caplog.at_level(logging.WARNING):
        patch = Editor(handle_of(model, tok), hp, cache_dir=tmp_path, progress=False).edit([REQ])
    lines = [r.getMessage() for r in caplog.records if "sampling" in r.getMessage()]
    assert len(lines) == 1 and "2,000 tokens from the model itself" in lines[0]
    st = patch.edits[0].diagnostics["stats"]
    assert st["corpus"] == "sampled from the model: 2000 tokens, seed 0"
    assert 1000 < st["n_tokens"] <= 2000  # re-read as text: the decoded samples may re-tokenize shorter
    assert list((tmp_path / "corpus").glob("sampled-*.jsonl"))
