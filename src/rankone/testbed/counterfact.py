"""A world of CounterFact's *true* facts, shaped like a pretrained model's knowledge.

Finding from a prototype: a tiny GPT-2 trained on CounterFact prompts verbatim (one prompt per
subject, drilled to p≈0.99) could not be edited by ROME (efficacy 0.05; the value vector hit
the norm clamp), while a synthetic world with several phrasings per fact edited at 0.95. So
this world gives each fact several phrasings drawn from other records of the same relation,
holds some out, and mentions subjects in filler; training uses label smoothing and stops at a
target accuracy instead of drilling answers to certainty.

Two input formats, detected by keys:
* flat:  {case_id, prompt, subject, target_new, ground_truth, rephrase_prompt,
          locality_prompt, locality_ground_truth}
* ROME:  {case_id, requested_rewrite{prompt, subject, target_new{str}, target_true{str},
          relation_id}, paraphrase_prompts, neighborhood_prompts}

Flat records carry no relation id, so relations are recovered: two prompt templates belong to
the same relation when a record's locality (neighbourhood) prompt — same relation, other
subject — matches the other template. Very short templates ("{}, in", "{} plays") are shared by
several relations and are left out of that union.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from rankone.core.counterfact import is_rome, rewrite
from rankone.core.errors import RankoneError
from rankone.core.jsonfiles import json_file
from rankone.testbed.world import Fact, Relation, World

MAX_PHRASINGS = 6  # per relation: the most frequent templates (more would only slow training)


def _norm_record(r: dict[str, Any]) -> dict[str, Any]:
    """One record in the flat schema, with its template and relation id (None for flat records)."""
    rw = rewrite(r)
    if is_rome(r):
        loc = (r.get("neighborhood_prompts") or [""])[0]
        loc = loc["prompt"] if isinstance(loc, dict) else loc
        par = (r.get("paraphrase_prompts") or [""])[0]
        out = {"case_id": r.get("case_id"), "subject": rw.subject, "prompt": rw.template.replace("{}", rw.subject),
               "target_new": rw.target_new, "ground_truth": rw.target_true, "rephrase_prompt": par,
               "locality_prompt": loc, "locality_ground_truth": rw.target_true if loc else ""}
    else:
        out = dict(r)
    return dict(out, template=rw.template, relation_id=rw.relation_id)


def load_records(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise RankoneError(f"CounterFact file not found: {p}; pass counterfact:PATH to a "
                           "counterfact JSON file (flat or original ROME format)")
    data = json_file(p)
    if not isinstance(data, list) or not data:
        raise RankoneError(f"{p} must hold a non-empty JSON list of CounterFact records")
    recs = [_norm_record(r) for r in data]
    # Keep records whose answers are single words and whose prompt contains the subject.
    return [r for r in recs if r["subject"] in r["prompt"] and r["ground_truth"].strip()
            and " " not in r["ground_truth"].strip()]


def _is_generic(t: str) -> bool:
    return len(re.sub(r"[^A-Za-z]", "", t.replace("{}", ""))) <= 6


def _matcher(templates: list[str]) -> list[tuple[str, re.Pattern[str]]]:
    # Longest literal first: the most specific template wins a match.
    ts = sorted(templates, key=lambda t: -len(t.replace("{}", "")))
    return [(t, re.compile("^" + re.escape(t).replace(r"\{\}", "(.+?)") + "$")) for t in ts]


def _match(prompt: str, rx: list[tuple[str, re.Pattern[str]]]) -> tuple[str, str] | None:
    for t, x in rx:
        m = x.match(prompt)
        if m:
            return t, m.group(1)
    return None


def group_relations(recs: list[dict[str, Any]]) -> dict[str, str]:
    """template -> relation root template (union-find over locality-prompt links)."""
    counts = Counter(r["template"] for r in recs)
    parent = {t: t for t in counts}

    def find(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    by_rel: dict[str, list[str]] = {}
    for r in recs:  # known relation ids (ROME format): union directly
        if r.get("relation_id"):
            by_rel.setdefault(r["relation_id"], []).append(r["template"])
    for ts in by_rel.values():
        for t in ts[1:]:
            parent[find(t)] = find(ts[0])
    rx = _matcher([t for t in counts if not _is_generic(t)])
    for r in recs:
        if _is_generic(r["template"]) or not r["locality_prompt"]:
            continue
        m = _match(r["locality_prompt"], rx)
        if m:
            parent[find(r["template"])] = find(m[0])
    return {t: find(t) for t in counts}


def counterfact_world(path: str | Path, seed: int = 0, n_records: int | None = None) -> World:
    """The true facts of the first `n_records` usable records (default 1,500)."""
    recs_all = load_records(path)
    n_records = n_records or 1500
    root = group_relations(recs_all)
    counts = Counter(r["template"] for r in recs_all)
    # Relation phrasings come from the whole file (more evidence), facts from the first N.
    members: dict[str, list[str]] = {}
    for t, rt in root.items():
        if not _is_generic(t):
            members.setdefault(rt, []).append(t)
    rel_of_template: dict[str, str] = {}
    relations: dict[str, Relation] = {}
    for i, (rt, ts) in enumerate(sorted(members.items(), key=lambda kv: -sum(counts[t] for t in kv[1]))):
        ts = sorted(ts, key=lambda t: (-counts[t], t))[:MAX_PHRASINGS]
        if len(ts) < 3:  # too few phrasings to train some and hold one out
            continue
        rid = f"R{i:02d}"
        relations[rid] = Relation(id=rid, phrasings=ts, objects=[])
        for t in ts:
            rel_of_template[t] = rid
    rx = _matcher(list(rel_of_template))

    facts: dict[tuple[str, str], Fact] = {}
    extra: list[dict[str, str]] = []
    records: list[dict[str, Any]] = []
    fact_index: dict[tuple[str, str], int] = {}

    def add_fact(subj: str, rid: str, obj: str, must_train: str | None) -> int | None:
        key = (subj, rid)
        if key in facts:  # same subject and relation twice: keep the first, drop conflicts
            return fact_index[key] if facts[key].object == obj else None
        rel = relations[rid]
        n = len(rel.phrasings)
        held = len(facts) % n
        if must_train is not None and rel.phrasings[held] == must_train:
            held = (held + 1) % n  # the record's own prompt is always trained
        facts[key] = Fact(subject=subj, relation=rid, object=obj, heldout=[held])
        fact_index[key] = len(fact_index)
        if obj not in rel.objects:
            rel.objects.append(obj)
        return fact_index[key]

    for r in recs_all:
        if len(records) >= n_records:
            break
        gt = r["ground_truth"].strip()
        # The record's relation: its own template, else the template its locality prompt matches.
        rid = rel_of_template.get(r["template"])
        loc = _match(r["locality_prompt"], rx) if r["locality_prompt"] else None
        if rid is None and loc is not None and r["locality_ground_truth"].strip() == gt:
            rid = rel_of_template[loc[0]]
        if rid is None:
            continue
        fi = add_fact(r["subject"], rid, gt, r["template"])
        if fi is None:
            continue
        if r["template"] not in rel_of_template:  # generic prompt: train it verbatim
            extra.append({"prompt": r["prompt"], "object": gt})
        lfi = None
        lgt = r["locality_ground_truth"].strip()
        if loc is not None and lgt and " " not in lgt and rel_of_template[loc[0]] == rid:
            lfi = add_fact(loc[1], rid, lgt, loc[0])
        if lfi is None and r["locality_prompt"] and lgt:
            extra.append({"prompt": r["locality_prompt"], "object": lgt})
        records.append({k: r[k] for k in ("case_id", "subject", "prompt", "target_new",
                                          "ground_truth", "rephrase_prompt", "locality_prompt",
                                          "locality_ground_truth")}
                       | {"relation": rid, "fact": fi, "locality_fact": lfi})
    if len(records) < 1:
        raise RankoneError(f"no usable CounterFact records in {path}")
    for rel in relations.values():  # edit targets must be known objects of the relation
        for rec in records:
            if rec["relation"] == rel.id and " " not in rec["target_new"].strip() \
                    and rec["target_new"].strip() not in rel.objects:
                rel.objects.append(rec["target_new"].strip())
    used = {f.relation for f in facts.values()}
    fact_list = list(facts.values())
    return World(name=f"counterfact-{len(records)}", seed=seed, kind="counterfact",
                 relations=[r for r in relations.values() if r.id in used],
                 subjects=list(dict.fromkeys(f.subject for f in fact_list)),
                 facts=fact_list, extra=extra, records=records)
