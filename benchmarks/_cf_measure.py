"""Measuring one CounterFact case on a real model (benchmarks/real_counterfact.py and the scripts
built on it): ROME's metrics, generation-based success, degenerate runs, the subject's other facts,
fluency; and why paraphrases miss."""

from __future__ import annotations

import argparse
from typing import Any

from rankone.core.errors import RankoneError
from rankone.eval.cases import Case
from rankone.eval.metrics import continuations, degenerate, evaluate_cases, fluency, score
from rankone.models.generation import says


def subject_facts(cases: list[Case]) -> tuple[dict[str, list[tuple[str, str, str]]], dict[str, set[str]]]:
    """The facts of each subject, (template, prompt, true answer), and each template's answers
    (true and new, lower-cased): what `other_facts` reads."""
    by: dict[str, list[tuple[str, str, str]]] = {}
    pool: dict[str, set[str]] = {}
    for c in cases:
        pool.setdefault(c.template, set()).update(x.lower() for x in (c.target_true, c.target_new) if x)
        if c.target_true and (c.template, c.prompt, c.target_true) not in by.setdefault(c.subject, []):
            by[c.subject].append((c.template, c.prompt, c.target_true))
    return by, pool


def other_facts(case: Case, index: tuple[dict, dict], most: int = 5) -> list[tuple[str, str]]:
    """The edited subject's facts of other relations, as (prompt, true answer). CounterFact's flat
    records carry no relation id, so a fact counts as another relation when no answer of its
    template is an answer of the case's template (twin cities, or the languages of a place, are
    one relation with many true answers: those are left out)."""
    by, pool = index
    mine = pool.get(case.template, set())
    return [(p, t) for tpl, p, t in by.get(case.subject, []) if tpl != case.template and not pool[tpl] & mine][:most]


def _om(model: Any, tok: Any, case: Case, facts: list[tuple[str, str]]) -> tuple[float, float, int]:
    """OS, OM over the subject's other facts: P(true_j) > P(new), P(true_j) − P(new) (NaN: none)."""
    pairs = []
    for p, t in facts:
        try:
            score(model, tok, [(p, t), (p, case.target_new)])  # alignable with both targets?
            pairs += [(p, t), (p, case.target_new)]
        except RankoneError:
            continue
    if not pairs:
        return float("nan"), float("nan"), 0
    sc = score(model, tok, pairs)
    d = [sc[i].p() - sc[i + 1].p() for i in range(0, len(sc), 2)]
    return sum(x > 0 for x in d) / len(d), sum(d) / len(d), len(d)


def measure(model: Any, tok: Any, case: Case, facts: list[tuple[str, str]], args: argparse.Namespace) -> dict[str, Any]:
    """Every metric of one case on the model as it is now."""
    m = evaluate_cases(model, tok, [case])[0]
    n_para, near_prompts = len(case.paraphrase_prompts), case.neighborhood_prompts[:1]
    said, *rest = continuations(model, tok, [case.prompt, *case.paraphrase_prompts, *near_prompts], args.gen_new)  # greedy
    para, near = rest[:n_para], rest[n_para:]
    text = tok.decode(said, skip_special_tokens=True)
    m["gs"], m["gs_true"] = float(says(text, case.target_new, anywhere=True)), float(says(text, case.target_true, anywhere=True))
    m["continuation"] = text
    m["gps"] = sum(says(tok.decode(x, skip_special_tokens=True), case.target_new, anywhere=True) for x in para) / n_para if para else float("nan")
    m["gns"] = sum(says(tok.decode(x, skip_special_tokens=True), t, anywhere=True) for x, t in zip(near, case.neighborhood_targets)) \
        / len(near) if near else float("nan")  # the neighbour's greedy continuation still states its answer
    m["degenerate"] = float(any(degenerate(tok, x) for x in [said, *para, *near]))
    m["os"], m["om"], m["n_other_facts"] = _om(model, tok, case, facts)
    if args.gen_tokens:
        m["fluency"] = fluency(model, tok, case.generation_prompts, args.gen_tokens)[0]
    return m


def ps_misses(results: dict[str, dict[str, dict]], ids: list[str], method: str, other: str = "p-rome") -> str:
    """Why paraphrases fail: how many of `method`'s PS misses `other` shares, and in how many the
    paraphrase prompt barely separates the two answers after the edit (|PM| < 0.01)."""
    rows = results.get(method, {})
    miss = [i for i in ids if i in rows and rows[i]["ps"] < 1]
    if not miss:
        return ""
    shared = sum(results[other][i]["ps"] < 1 for i in miss if i in results.get(other, {}))
    flat = sum(abs(rows[i]["pm"]) < 0.01 for i in miss)
    return (f"{method}'s paraphrase misses: {len(miss)} of {len(ids)} cases; {other} misses {shared} of the same; in {flat} "
            f"the edited model gives the two answers within 1 % of each other on the paraphrase (|PM| < 0.01), i.e. the "
            f"'paraphrase' hardly asks for the attribute (e.g. \"X's greatest strength is\" for a player's position).")


def es_misses(results: dict[str, dict[str, dict]], ids: list[str], method: str, other: str = "p-rome") -> str:
    """Where `method` misses ES: the cosine of its bare key with the averaged one there, against all
    cases (r-ROME writes at k̄, so a bare key far from k̄ receives little of δ), and `other` there."""
    rows = results.get(method, {})
    have = [i for i in ids if i in rows and rows[i].get("key_cosine") is not None]
    miss = [i for i in have if rows[i]["es"] < 1]
    if not miss:
        return ""
    cos = sorted(rows[i]["key_cosine"] for i in have)
    there = ", ".join(f"{rows[i]['key_cosine']:.2f}" for i in miss)
    fixed = sum(results[other][i]["es"] == 1 for i in miss if i in results.get(other, {}))
    return (f"{method}'s efficacy misses: {len(miss)} of {len(have)} cases, with key cosine k̄·k_o {there} "
            f"(median over all cases {cos[len(cos) // 2]:.2f}); {other} passes {fixed} of them.")
