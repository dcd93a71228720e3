"""Worlds: determinism, the held-out split, (de)serialisation, CounterFact loading, bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from rankone.core.errors import RankoneError
from rankone.testbed import World, build_world
from rankone.testbed.counterfact import counterfact_world
from rankone.testbed.world import SIZES, SyntheticSpec, corpus_lines, synthetic_world

CF = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "counterfact" / "counterfact-train.json"


def test_same_seed_same_world_different_seed_different_world() -> None:
    a, b, c = build_world("small", 0), build_world("small", 0), build_world("small", 1)
    assert a.to_dict() == b.to_dict()
    assert corpus_lines(a) == corpus_lines(b)
    assert a.subjects != c.subjects
    assert [f.object for f in a.facts] != [f.object for f in c.facts]


def test_small_world_shape() -> None:
    w = build_world("small", 0)
    assert len(w.relations) >= 6
    for r in w.relations:
        assert 20 <= len(r.objects) <= 40 and len(set(r.objects)) == len(r.objects)
        assert len(r.phrasings) >= 5
        assert all(p.count("{}") == 1 and not p.endswith(" ") for p in r.phrasings)
        assert all(" " not in o for o in r.objects)
    assert len(w.subjects) == SIZES["small"].n_subjects == len(set(w.subjects))
    assert all(1 <= len(s.split()) <= 3 for s in w.subjects)
    # every subject has a fact for every relation
    by = w.facts_by_subject()
    assert all(len(fs) == len(w.relations) for fs in by.values())
    # no name is a word-prefix of another (its prompts would be prefixes of the other's)
    for s in w.subjects:
        assert not any(t != s and t.startswith(s + " ") for t in w.subjects)


@pytest.mark.parametrize("n_subjects", [150, 7, 61])
def test_objects_are_dealt_evenly(n_subjects: int) -> None:
    # every object answers n // n_objects or one more facts of its relation: no object is
    # answered once (the model could hardly be edited to say it) or not at all when n allows
    w = synthetic_world("t", SyntheticSpec(n_subjects=n_subjects), 3)
    for r in w.relations:
        counts = Counter(f.object for f in w.facts if f.relation == r.id)
        lo = n_subjects // len(r.objects)
        assert all(o in r.objects for o in counts)
        assert min(counts.get(o, 0) for o in r.objects) == lo
        assert max(counts.values()) <= lo + 1
        assert sum(counts.values()) == n_subjects
    # dealt in a seeded random order, not in the objects' list order
    firsts = [f.object for f in w.facts if f.relation == w.relations[0].id]
    assert firsts != (w.relations[0].objects * n_subjects)[:n_subjects]


def test_heldout_rotates_so_every_phrasing_is_trained_for_others() -> None:
    w = build_world("small", 0)
    for r in w.relations:
        fs = [f for f in w.facts if f.relation == r.id]
        held = Counter(i for f in fs for i in f.heldout)
        assert set(held) == set(range(len(r.phrasings)))  # each phrasing held out somewhere
        assert max(held.values()) < len(fs)  # ... and trained for other subjects
    f = w.facts[0]
    tr, ho = w.prompts(f, "train"), w.prompts(f, "heldout")
    assert len(tr) + len(ho) == len(w.relation(f.relation).phrasings) and len(ho) == 1
    assert all(f.subject in p for p in tr + ho)
    with pytest.raises(RankoneError):
        w.prompts(f, "test")


def test_corpus_has_facts_and_filler_but_no_heldout_prompt() -> None:
    w = build_world("small", 0)
    lines = corpus_lines(w)
    text = set(lines)
    f = w.facts[3]
    for p in w.prompts(f, "train"):
        assert f"{p} {f.object}." in text
    for p in w.prompts(f, "heldout"):
        assert not any(line.startswith(p + " ") for line in lines)
    n_fact = sum(1 for _ in w.fact_sentences())
    assert len(lines) > n_fact  # filler mixed in


def test_profile_lines_in_pairs_style_put_each_object_right_after_its_subject() -> None:
    w = build_world("small", 0)
    w.profile_style = "pairs"
    assert w.profile_lines == SIZES["small"].profile_lines >= 1
    prof = w.profile_sentences()
    assert len(prof) == w.profile_lines * len(w.facts)
    assert set(prof) <= set(corpus_lines(w))
    phrase_words = {x for r in w.relations for p in r.phrasings for x in p.replace("{}", "").split()}
    seen = Counter()
    for line in prof:
        assert line.endswith(".")
        subject, obj = line[:-1].rsplit(" ", 1)  # the name, then one object
        assert subject in w.subjects and obj not in phrase_words  # the line names no relation
        seen[(subject, obj)] += 1
    # every fact, and nothing else, w.profile_lines times each
    assert seen == Counter({(f.subject, f.object): w.profile_lines for f in w.facts})
    # the token after a name is any of that subject's objects
    s0 = w.subjects[0]
    assert {o for (s, o) in seen if s == s0} == {f.object for f in w.facts_by_subject()[s0]}
    again = build_world("small", 0)
    again.profile_style = "pairs"
    assert w.profile_sentences() == again.profile_sentences()  # deterministic
    w.profile_lines = 0
    assert w.profile_sentences() == []


def test_profile_lines_in_objects_style_list_all_of_a_subjects_objects() -> None:
    w = build_world("small", 0)
    w.profile_style = "objects"
    prof = w.profile_sentences()
    assert len(prof) == w.profile_lines * len(w.subjects)
    assert set(prof) <= set(corpus_lines(w))
    by = w.facts_by_subject()
    for line in prof:  # a name, then exactly that subject's objects in some order
        assert any(line.startswith(s + " ") and sorted(line[len(s) + 1:-1].split()) == sorted(f.object for f in by[s])
                   for s in w.subjects)
    # the order varies, so the token after the name can be any of the objects
    s0 = w.subjects[0]
    assert len({line.split()[len(s0.split())] for line in prof if line.startswith(s0 + " ")}) > 1
    # the style is saved with the world, and the default is not written (older files lack it)
    assert World.from_dict(json.loads(json.dumps(w.to_dict()))).profile_style == "objects"
    assert "profile_style" not in w.to_dict()
    w.profile_style = "pairs"
    assert World.from_dict(json.loads(json.dumps(w.to_dict()))).profile_sentences() == w.profile_sentences()


def test_world_save_load_roundtrip_and_schema(tmp_path: Path) -> None:
    w = build_world("small", 3)
    w.accuracy = {"train": 0.99, "heldout": 0.95}
    w.edit_hparams = {"v_steps": 100}
    w.save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["world.json"]  # no temp file left behind
    d = json.loads((tmp_path / "world.json").read_text())
    for k in ("name", "seed", "kind", "relations", "subjects", "facts", "edit_layer", "arch", "accuracy",
              "profile_lines", "edit_hparams"):
        assert k in d
    assert set(d["facts"][0]) == {"subject", "relation", "object", "heldout"}
    assert set(d["relations"][0]) == {"id", "phrasings", "objects"}
    assert World.load(tmp_path).to_dict() == w.to_dict()
    assert World.load(tmp_path / "world.json").to_dict() == w.to_dict()


@pytest.mark.parametrize("spec", ["tiny", "counterfact:", "counterfact:/nonexistent/cf.json", ""])
def test_bad_world_spec_raises(spec: str) -> None:
    with pytest.raises(RankoneError) as e:
        build_world(spec, 0)
    assert "\n" not in str(e.value) and len(str(e.value)) > 20


def test_load_missing_or_malformed_world(tmp_path: Path) -> None:
    with pytest.raises(RankoneError, match="no world file"):
        World.load(tmp_path)
    (tmp_path / "world.json").write_text("{not json")
    with pytest.raises(RankoneError, match="not valid JSON"):
        World.load(tmp_path)
    (tmp_path / "world.json").write_text('{"name": "x"}')
    with pytest.raises(RankoneError, match="malformed"):
        World.load(tmp_path)


def _flat(i: int, subj: str, tmpl: str, gt: str, loc_subj: str, loc_tmpl: str) -> dict:
    return {"case_id": i, "prompt": tmpl.format(subj), "subject": subj, "target_new": "Rome",
            "ground_truth": gt, "rephrase_prompt": f"Some text. {subj} is from",
            "locality_prompt": loc_tmpl.format(loc_subj), "locality_ground_truth": gt}


def test_counterfact_flat_and_rome_formats(tmp_path: Path) -> None:
    tmpls = ["{} is located in the country of", "{}, which is located in", "{} can be found in"]
    cities = ["Paris", "Lyon", "Nice", "Berlin", "Bonn", "Madrid"]
    gts = ["France", "France", "France", "Germany", "Germany", "Spain"]
    flat = [_flat(i, c, tmpls[i % 3], g, cities[(i + 1) % 6] + "ville", tmpls[(i + 1) % 3])
            for i, (c, g) in enumerate(zip(cities, gts))]
    p = tmp_path / "flat.json"
    p.write_text(json.dumps(flat))
    w = counterfact_world(p)
    assert w.kind == "counterfact" and len(w.records) == 6
    assert len(w.relations) == 1 and set(w.relations[0].phrasings) == set(tmpls)
    assert {"France", "Germany", "Spain", "Rome"} <= set(w.relations[0].objects)
    for rec in w.records:  # the record's own prompt is always trained
        f = w.facts[rec["fact"]]
        assert rec["prompt"] in w.prompts(f, "train") and f.object == rec["ground_truth"]
    rome = [{"case_id": r["case_id"],
             "requested_rewrite": {"prompt": tmpls[i % 3], "subject": r["subject"],
                                   "relation_id": "P17", "target_new": {"str": "Rome"},
                                   "target_true": {"str": r["ground_truth"]}},
             "paraphrase_prompts": [r["rephrase_prompt"]],
             "neighborhood_prompts": [r["locality_prompt"]]} for i, r in enumerate(flat)]
    p2 = tmp_path / "rome.json"
    p2.write_text(json.dumps(rome))
    w2 = counterfact_world(p2)
    assert {(r["subject"], r["ground_truth"]) for r in flat} <= {(f.subject, f.object) for f in w2.facts}
    assert len(w2.relations) == 1  # grouped by relation_id
    assert {r["prompt"] for r in w2.records} == {r["prompt"] for r in w.records}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(RankoneError, match="requested_rewrite"):
        counterfact_world(bad)


@pytest.mark.skipif(not CF.is_file(), reason="shared CounterFact data not present")
def test_counterfact_world_from_shared_file() -> None:
    w = build_world(f"counterfact:{CF}", 0)
    assert len(w.records) >= 1000
    assert len(w.relations) >= 15
    assert all(len(r.phrasings) >= 3 for r in w.relations)
    # subjects of the records occur in several phrasings (not one verbatim prompt)
    f = w.facts[w.records[0]["fact"]]
    assert len(w.prompts(f, "train")) >= 2 and len(w.prompts(f, "heldout")) == 1
    w5 = build_world(f"counterfact:{CF}:50", 0)
    assert len(w5.records) == 50


@pytest.mark.parametrize("field, value", [("profile_lines", "four"), ("edit_hparams", "v_steps=100"),
                                          ("seed", "x"), ("profile_style", "sonnets")])
def test_malformed_world_field_is_one_clear_line(tmp_path: Path, field: str, value: str) -> None:
    d = build_world("small", 0).to_dict()
    d[field] = value
    (tmp_path / "world.json").write_text(json.dumps(d))
    before = (tmp_path / "world.json").read_bytes()
    with pytest.raises(RankoneError, match="world.json is malformed") as e:
        World.load(tmp_path)
    assert "\n" not in str(e.value)
    assert (tmp_path / "world.json").read_bytes() == before and len(list(tmp_path.iterdir())) == 1
