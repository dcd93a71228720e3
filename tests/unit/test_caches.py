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
    real = tokens.decode

    def spy(*a):
        out = real(*a)
        seen.append(out.shape)
        return out

    monkeypatch.setattr(tokens, "decode", spy)
    sample_prefixes(model, tok, [[4, 5]], 0, starts=("The",))
    sample_prefixes(model, tok_bos, [[4, 5]], 0, starts=("The",))
    # (length 4) counts every token, the starter word and a BOS included, as ROME's generate_fast
    assert seen == [torch.Size([5, 4]), torch.Size([5, 4])]
    seen.clear()
    batched = sample_prefixes(model, tok, SPEC, 3, starts=("The", "I"))  # two lengths, two starters: one pass
    assert len(seen) == 1 and seen[0] == torch.Size([8, 6]) and len(batched) == 8  # 2 texts a starter and length
    monkeypatch.undo()
    # the texts of drawing each (length, starter) group in turn with one generator, as before batching
    gen, one_by_one = torch.Generator().manual_seed(3), []
    for length, count in SPEC:
        for start in ("The", "I"):
            lead = tokens.encode(tok, start)[0]
            ids = tokens.sample_tokens(model, torch.tensor([lead] * (count // 2)), max(1, length - len(lead)), gen, 5)
            texts = [tok.decode(r, skip_special_tokens=True) for r in ids.tolist()]
            one_by_one += [t.replace("{", " ").replace("}", " ").replace("\n", " ").strip() + ". {}" for t in texts]
    assert batched == one_by_one
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


def test_an_interrupted_sampled_corpus_resumes_where_it_stopped(tok, tmp_path, monkeypatch, capsys):
    model = make_model("gpt2")
    whole = sampled_corpus(model, tok, 300, 5, 25, 4, tmp_path / "a", progress=False).read_text()
    real, calls, stop = corpus_mod.sample_tokens, [], [3]

    def stop_at_third_batch(*a, **k):
        calls.append(1)
        if len(calls) == stop[0]:
            raise KeyboardInterrupt  # Ctrl-C while the third batch is sampled
        return real(*a, **k)

    monkeypatch.setattr(corpus_mod, "sample_tokens", stop_at_third_batch)
    with pytest.raises(KeyboardInterrupt):
        sampled_corpus(model, tok, 300, 5, 25, 4, tmp_path / "b")
    out = capsys.readouterr().err
    assert "stopped after" in out and "done" not in out  # an interrupted run is not "done"
    assert "0/300 tokens" in out  # the total is what will be produced: 12 documents of 25 tokens
    partial = list((tmp_path / "b" / "corpus").glob("*.partial"))
    assert len(partial) == 1 and len(partial[0].read_text().splitlines()) == 3  # its key, two batches
    with open(partial[0], "a") as fh:
        fh.write('{"batch": 2, "texts": ["cut sh')  # a line cut short by the interruption
    calls.clear()
    stop[0] = None
    again = sampled_corpus(model, tok, 300, 5, 25, 4, tmp_path / "b")
    n_batches = len(corpus_mod.sampling_plan(tok, 300, 25, 4, model.config.n_positions))
    assert len(calls) == n_batches - 2 and again.read_text() == whole  # only the batches left; the same corpus
    assert not partial[0].exists() and "done in" in capsys.readouterr().err


def test_sampling_plan_batches_by_starter_length_and_counts_what_it_makes(tok, tok_bos):
    plan = corpus_mod.sampling_plan(tok, 1000, 30, 8, limit=None)
    assert sum(len(b.starts) for b in plan) == 34 and sum(b.tokens for b in plan) == 34 * 30  # ceil(1000 / 30) docs
    assert all(len({len(tok(s)["input_ids"]) for s in b.starts}) == 1 and len(b.starts) <= 8 for b in plan)
    capped = corpus_mod.sampling_plan(tok_bos, 100, 30, 8, limit=20)  # a context window of 20 caps the documents
    assert all(len(tok_bos(b.starts[0])["input_ids"]) + b.n_new == 20 for b in capped)


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
