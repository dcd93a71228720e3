"""The metrics against values computed by hand on a tiny real model (manual softmax products)."""

import math
import re

import pytest
import torch

from rankone.eval.cases import Case
from rankone.core.errors import RankoneError
from rankone.eval.glue import binary_scores, glue_fewshot, load_glue
from rankone.eval.metrics import (continuation_ids, continuations, degenerate, evaluate_cases, fluency, generate, hmean,
                                  knows, ngram_entropy, score, summarize, words)
from rankone.models.generation import greedy, target_logprob
from rankone.core.tokens import EditRequest
from tiny import make_model


@pytest.fixture(scope="module")
def model():
    return make_model("gpt2", seed=3)


def manual_prob(model, tok, prompt, target):
    """p(target | prompt) by hand: one forward pass, softmax written out, product over target tokens."""
    full = prompt + " " + target
    ids = tok(full)["input_ids"]
    # The target's tokens are what follows the prompt; this tokenizer gives the separating space
    # a token of its own, which belongs to the context (as with rankone.models.generation.target_logprob).
    pre = tok(prompt + " ")["input_ids"]
    n_prompt = len(pre) if ids[:len(pre)] == pre else len(tok(prompt)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    probs = []
    for pos in range(n_prompt, len(ids)):
        z = logits[pos - 1]
        probs.append(float(torch.exp(z[ids[pos]]) / torch.exp(z).sum()))
    return math.prod(probs), len(probs)


PAIRS = [("Danielle Darrieux was born in", "Paris"), ("The capital of France is", "Rome and Paris"),
         ("Toko Yasuda plays the", "guitar")]


def test_score_is_the_product_of_softmax_probabilities(model, tok):
    got = score(model, tok, PAIRS, batch_size=2)  # two batches of different lengths, right-padded
    for (p, t), s in zip(PAIRS, got):
        prob, n = manual_prob(model, tok, p, t)
        assert s.n_tokens == n
        assert s.logprob == pytest.approx(math.log(prob), abs=1e-4)
        assert s.p("sum") == pytest.approx(prob, rel=1e-3)
        assert s.p("mean") == pytest.approx(prob ** (1 / n), rel=1e-3)
        assert s.logprob == pytest.approx(target_logprob(model, tok, p, t), abs=1e-4)


def test_top1_and_knows_agree_with_the_argmax(tok):
    # A model that "knows" one answer: the final layer norm's bias pushes every position's
    # hidden state towards the embedding of the token "P", so greedy decoding always says "P".
    m = make_model("gpt2", seed=3)
    pid = tok.convert_tokens_to_ids("P")
    with torch.no_grad():
        w = m.transformer.wte.weight[pid]
        m.transformer.ln_f.bias += 200 * w / w.norm()
    prompt = "Danielle Darrieux was born in"
    assert greedy(m, tok, prompt, 2).replace(" ", "").startswith("P")
    case = lambda true: Case.of("c", EditRequest.create("{} was born in", "Danielle Darrieux", "Rome"), true)  # noqa: E731
    assert knows(m, tok, [case("P"), case("Paris"), case("Rome")]) == [True, True, False]
    s = score(m, tok, [(prompt, "P"), (prompt, "Paris"), (prompt, "Rome")])
    assert [x.first_ok for x in s] == [True, True, False]
    assert [x.top1 for x in s] == [True, False, False]  # "Paris" = P·ar·is: greedy gives P·P·P


def test_known_over_new_compares_the_two_answers_and_a_limit_stops_reading(model, tok):
    from rankone.eval.protocol import select_cases

    subjects = ["Danielle Darrieux", "Toko Yasuda", "Blaise Pascal", "Michel Rocard", "Jean Gabin", "Edith Piaf"]
    cities = ["Rome", "Paris", "London", "Vienna", "Madrid", "Berlin"]
    cases = [Case.of(f"c{i}", EditRequest.create("{} was born in", s, cities[i]), cities[(i + 2) % 6])
             for i, s in enumerate(subjects)]
    p = lambda c, t: manual_prob(model, tok, c.prompt, t)  # noqa: E731
    by_hand = [p(c, c.target_true)[0] ** (1 / p(c, c.target_true)[1]) > p(c, c.target_new)[0] ** (1 / p(c, c.target_new)[1])
               for c in cases]
    assert knows(model, tok, cases, rule="over-new") == by_hand and 0 < sum(by_hand) < len(cases)
    with pytest.raises(RankoneError, match="unknown rule 'sometimes'"):
        knows(model, tok, cases, rule="sometimes")
    known = [c for c, k in zip(cases, by_hand) if k]
    got, info = select_cases(model, tok, cases, "over-new", limit=1, chunk=2)
    first = cases.index(known[0])
    assert got == known[:1] and info["n_read"] == 2 * (first // 2 + 1) and info["known_rule"] == "over-new"
    every, info = select_cases(model, tok, cases, "over-new")
    assert every == known and info["n_read"] == len(cases) and info["n_known"] == len(known)


def test_case_metrics_match_hand_computation(model, tok):
    req = EditRequest.create("{} was born in", "Danielle Darrieux", "Rome")
    case = Case.of("c1", req, "Paris", paraphrase_prompts=["Danielle Darrieux is a native of", "The home town of Danielle Darrieux is"],
                neighborhood_prompts=["Toko Yasuda was born in", "The Eiffel Tower is in"],
                neighborhood_targets=["Tokyo", "Paris"])
    for norm in ("mean", "sum"):
        def p(prompt, target):
            prob, n = manual_prob(model, tok, prompt, target)
            return prob ** (1 / n) if norm == "mean" else prob

        m = evaluate_cases(model, tok, [case], norm=norm)[0]
        pn, pt = p(case.prompt, "Rome"), p(case.prompt, "Paris")
        assert m["es"] == float(pn > pt)
        assert m["em"] == pytest.approx(pn - pt, abs=1e-6)
        par = [(p(q, "Rome"), p(q, "Paris")) for q in case.paraphrase_prompts]
        assert m["ps"] == pytest.approx(sum(a > b for a, b in par) / 2)
        assert m["pm"] == pytest.approx(sum(a - b for a, b in par) / 2, abs=1e-6)
        nb = [(p(q, "Rome"), p(q, t)) for q, t in case.neighbours()]
        assert m["ns"] == pytest.approx(sum(t > a for a, t in nb) / 2)
        assert m["nm"] == pytest.approx(sum(t - a for a, t in nb) / 2, abs=1e-6)


def test_a_case_whose_new_target_is_the_true_one_scores_no_efficacy(model, tok):
    # p(new) > p(true) is strict: equal probabilities are not a success (ES = PS = 0)
    case = Case.of("c", EditRequest.create("{} plays the", "Toko Yasuda", "guitar"), "guitar",
                ["Toko Yasuda is a player of the"], ["Danielle Darrieux plays the"], ["guitar"])
    m = evaluate_cases(model, tok, [case])[0]
    assert m["es"] == 0.0 and m["ps"] == 0.0 and m["ns"] == 0.0 and m["em"] == 0.0


def test_summary_and_harmonic_score():
    per = [dict(es=1.0, em=0.2, ps=1.0, pm=0.1, ns=0.5, nm=0.0, top1_new=1.0, paraphrase_top1=0.0),
           dict(es=0.0, em=-0.2, ps=0.0, pm=-0.1, ns=0.5, nm=0.2, top1_new=0.0, paraphrase_top1=float("nan"))]
    s = summarize(per)
    assert s["es"] == 0.5 and s["ps"] == 0.5 and s["ns"] == 0.5 and s["n"] == 2
    assert s["paraphrase_top1"] == 0.0  # NaN (no paraphrase) is left out of the mean
    assert s["score"] == pytest.approx(0.5)
    assert hmean([1.0, 0.5, 0.5]) == pytest.approx(3 / (1 + 2 + 2))
    assert hmean([1.0, 0.0, 0.9]) == 0.0
    assert math.isnan(hmean([1.0, float("nan"), 0.5]))


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # all distinct: H2 = log2(3), H3 = log2(2)
    assert ngram_entropy("w x y z") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("the the the the the the") == 0.0  # degenerate repetition: no entropy
    assert ngram_entropy("") == 0.0
    assert words("Paris, France's capital.") == ["Paris", ",", "France's", "capital", "."]


def test_generation_is_seeded_and_top1_is_greedy(model, tok):
    prompt = "The capital of France is"
    a = generate(model, tok, prompt, 8, top_k=5, seed=1)
    assert a == generate(model, tok, prompt, 8, top_k=5, seed=1)
    assert a.startswith(prompt)
    assert generate(model, tok, prompt, 6, top_k=1) == prompt + greedy(model, tok, prompt, 6)
    f, texts = fluency(model, tok, [prompt, "Rome is"], 10)
    assert f == pytest.approx(sum(ngram_entropy(t) for t in texts) / 2)
    assert (f, texts) == fluency(model, tok, [prompt, "Rome is"], 10)  # seeded
    assert texts[0].startswith(prompt) and texts[1].startswith("Rome is")


def test_batched_greedy_continuations_equal_one_prompt_at_a_time(model, tok):
    prompts = ["The capital of France is", "Rome is", "Danielle Darrieux was born in the city of"]  # unequal lengths
    assert continuations(model, tok, prompts, 7) == [continuation_ids(model, tok, p, 7, top_k=1) for p in prompts]
    a = continuations(model, tok, prompts, 7, top_k=5, seed=3)
    assert a == continuations(model, tok, prompts, 7, top_k=5, seed=3) and all(len(x) <= 7 for x in a)


def test_continuation_ids_keep_special_tokens_and_degenerate_finds_runs(model, tok):
    prompt = "The capital of France is"
    ids = continuation_ids(model, tok, prompt, 6, top_k=1)
    assert prompt + tok.decode(ids, skip_special_tokens=True) == generate(model, tok, prompt, 6, top_k=1)
    special = tok.all_special_ids[0]
    assert degenerate(tok, [5, 5, 5, 5])  # one token four times in a row
    assert not degenerate(tok, [5, 5, 5, 6, 5, 5, 5])
    assert not degenerate(tok, [5, 6, 5, 6, 5, 6])
    assert degenerate(tok, [5, 6, special, 7])  # a special token, which decoding would hide
    assert tok.decode([5, special, 6], skip_special_tokens=True) == tok.decode([5, 6], skip_special_tokens=True)


def test_long_prompts_lose_their_oldest_tokens(model, tok):
    long = "Rome is in Italy. " * 40  # far beyond the tiny model's 128 positions
    s = score(model, tok, [(long + "Paris is in", "France")])[0]
    ids = tok(long + "Paris is in France")["input_ids"][-128:]
    n = len([t for t in tok(" France")["input_ids"] if tok.decode([t]).strip()])  # the bare space is context
    assert s.n_tokens == n
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    want = sum(float(logp[p - 1, ids[p]]) for p in range(len(ids) - n, len(ids)))
    assert s.logprob == pytest.approx(want, abs=1e-4)


def test_binary_scores_by_hand():
    r = binary_scores([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])  # tp=2 fn=1 tn=1 fp=1
    assert r["acc"] == pytest.approx(3 / 5)
    assert r["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert r["mcc"] == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))


def test_glue_fewshot_runs_and_refuses_bad_files(model, tok, tmp_path):
    recs = [{"sentence": f"this film is {'great' if i % 2 else 'awful'} number {i}", "label": i % 2} for i in range(12)]
    r = glue_fewshot(model, tok, recs, "sst2", shots=2, n=6)
    # six queries (the demonstrations are never among them): acc is a count of six, and batching
    # (left padding) does not change any prediction
    assert r["n"] == 6 and round(r["acc"] * 6, 9).is_integer()
    assert glue_fewshot(model, tok, recs, "sst2", shots=2, n=6, batch_size=1) == r
    with pytest.raises(RankoneError, match="does not exist"):
        load_glue(str(tmp_path), "sst2")
    (tmp_path / "sst2.json").write_text('[{"text": "x"}]')
    with pytest.raises(RankoneError, match="records with"):
        load_glue(str(tmp_path), "sst2")
    with pytest.raises(RankoneError, match="unknown GLUE task"):
        load_glue(str(tmp_path), "mnli")


def test_states_matches_whole_words_ignoring_case_and_spacing():
    from rankone.models.generation import says

    states = lambda text, target: says(text, target, anywhere=True)  # noqa: E731
    assert states(" in rome, Italy", "Rome") and states("NEW\n york city", "New York")
    assert not states(" Romeo and Juliet", "Rome") and not states(" Paris-born", "Pari")
    assert not states(" New Jersey, York", "New York") and not states("anything", "  ")
    # an answer: the target first, as whole words, whatever the case and spacing
    assert says(" Rome, Italy", "Rome") and says("  new  York", "New York") and says("Paris.", "Paris")
    assert not says(" Parisian", "Paris") and not says(" in Rome", "Rome") and not says(" ", "Rome")
    assert states(" the C++ standard", "C++") and not states(" XC++", "C++")


def test_generation_success_reads_the_whole_greedy_continuation_not_the_targets_length():
    import json

    from rankone.eval.metrics import generation_success
    from rankone.models.generation import says
    from rankone.models.load import load_model
    from rankone.testbed import builtin_model_dir

    model, tok = load_model(builtin_model_dir())
    world = json.loads((builtin_model_dir() / "world.json").read_text())
    subject = world["facts"][0]["subject"]
    prompt = f"{subject} was born in"
    true = next(f["object"] for f in world["facts"] if f["subject"] == subject and f["relation"] == "birthplace")
    cont = greedy(model, tok, prompt, 20)  # decoded without a KV cache: an independent reading
    assert says(cont, true)  # the model knows the fact
    assert generation_success(model, tok, prompt, true) and generation_success(model, tok, prompt, true.upper())
    assert not generation_success(model, tok, prompt, true[:-1])  # a part of a word is not the word
    later = next(w.strip(".,") for w in cont.split()[3:] if w.strip(".,").isalpha() and w.lower() not in cont.split()[0].lower())
    assert not says(cont, later)  # a word well after the answer: the first-words reading misses it
    assert generation_success(model, tok, prompt, later)  # the generation-based one reads on
    assert not generation_success(model, tok, prompt, later, max_new_tokens=2)
    absent = next(o for f in world["facts"] if (o := f["object"]) and not re.search(rf"\b{re.escape(o)}\b", cont, re.I))
    assert not generation_success(model, tok, prompt, absent)
