"""Case loaders: flat and ROME CounterFact, testbed worlds, Case files, and their bad inputs."""

import json
from pathlib import Path

import pytest

from rankone.eval.cases import Case, cases_from_world, heldout_text, load_cases, save_cases
from rankone.core.errors import RankoneError
from rankone.testbed.world import SyntheticSpec, synthetic_world

REPO = Path(__file__).resolve().parents[2]
SHARED = next((p for p in (REPO.parent / "shared", REPO / "shared") if p.is_dir()), REPO.parent / "shared")

FLAT = [
    {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
     "target_new": "English", "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux grew up speaking",
     "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"},
    {"case_id": 1, "prompt": "The mother tongue of Blaise Pascal is", "subject": "Blaise Pascal",
     "target_new": "Dutch", "ground_truth": "French", "rephrase_prompt": "", "locality_prompt": "",
     "locality_ground_truth": ""},
    {"case_id": 2, "prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "violin",
     "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda performs on the",
     "locality_prompt": "Jimi Hendrix plays the", "locality_ground_truth": "guitar"},
    {"case_id": 3, "prompt": "The capital is Paris", "subject": "Lyon", "target_new": "x", "ground_truth": "y"},
]

ROME = [{
    "case_id": 7,
    "requested_rewrite": {"prompt": "{} was born in", "subject": "Danielle Darrieux", "relation_id": "P19",
                          "target_new": {"str": "Rome", "id": "Q220"}, "target_true": {"str": "Paris", "id": "Q90"}},
    "paraphrase_prompts": ["Danielle Darrieux came into the world in", "The birthplace of Danielle Darrieux is"],
    "neighborhood_prompts": ["Jean Gabin was born in", {"prompt": "Edith Piaf was born in", "target": "Belleville"}],
    "generation_prompts": ["Danielle Darrieux's hometown is", "Where is Danielle Darrieux from?"],
}]


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def test_flat_counterfact(tmp_path, caplog):
    cases = load_cases(write(tmp_path, "cf.json", FLAT))
    assert len(cases) == 3 and "skipped 1" in caplog.text  # record 3: subject not in its prompt
    c = cases[0]
    assert c.prompt == "The mother tongue of Danielle Darrieux is" and c.target_new == "English" and c.target_true == "French"
    assert c.paraphrase_prompts == ["Danielle Darrieux grew up speaking"]
    # the record's own neighbour first, then other records with the same template and true answer
    assert c.neighbours() == [("Michel Rocard is a native speaker of", "French"),
                              ("The mother tongue of Blaise Pascal is", "French")]
    assert cases[1].paraphrase_prompts == [] and cases[1].neighbours() == [("The mother tongue of Danielle Darrieux is", "French")]
    assert cases[2].neighbours() == [("Jimi Hendrix plays the", "guitar")]
    assert c.generation_prompts[0] == c.prompt


def test_rome_format(tmp_path):
    (c,) = load_cases(write(tmp_path, "rome.json", ROME))
    assert c.case_id == "7" and c.request.prompt == "{} was born in" and c.target_new == "Rome" and c.target_true == "Paris"
    assert c.relation == "P19" and len(c.paraphrase_prompts) == 2
    assert c.neighbours() == [("Jean Gabin was born in", "Paris"), ("Edith Piaf was born in", "Belleville")]
    assert c.generation_prompts == ROME[0]["generation_prompts"]


def test_case_files_round_trip_and_jsonl(tmp_path):
    cases = load_cases(write(tmp_path, "rome.json", ROME)) + load_cases(write(tmp_path, "cf.json", FLAT))
    save_cases(tmp_path / "c.jsonl", cases)
    again = load_cases(tmp_path / "c.jsonl")
    assert [c.to_dict() for c in again] == [c.to_dict() for c in cases]
    assert len(load_cases(tmp_path / "c.jsonl", n=2)) == 2


def test_world_cases():
    w = synthetic_world("t", SyntheticSpec(n_subjects=12, n_relations=3), seed=1)
    cases = cases_from_world(w, seed=0)
    assert len(cases) == len(w.facts)
    assert len({c.request.subject for c in cases[:12]}) == 12  # every subject once before any twice
    facts = {(f.subject, f.relation): f for f in w.facts}
    for c in cases:
        f = facts[(c.request.subject, c.relation)]
        assert c.target_true == f.object and c.target_new != f.object
        assert c.target_new in w.relation(f.relation).objects
        assert c.paraphrase_prompts == w.prompts(f, "heldout")  # never trained for this fact
        assert c.prompt in w.prompts(f, "train")
        assert c.neighbours() and all(c.request.subject not in p for p in c.neighborhood_prompts)
        assert c.target_new not in c.neighborhood_targets
        for p, t in c.neighbours():  # each neighbour is another subject's true fact of the same relation
            assert any(p in w.prompts(g) and g.object == t for g in w.facts if g.relation == c.relation)
    assert cases_from_world(w, seed=0)[5].to_dict() == cases[5].to_dict()  # deterministic
    text = heldout_text(w)
    assert "\n" not in text and text.count(".") >= 10


def test_world_folder_loads(tmp_path):
    w = synthetic_world("t", SyntheticSpec(n_subjects=5, n_relations=2), seed=1)
    w.save(tmp_path)
    assert [c.to_dict() for c in load_cases(tmp_path)] == [c.to_dict() for c in cases_from_world(w)]


@pytest.mark.parametrize("content, name, message", [
    (None, "missing.json", "does not exist"),
    ("{not json", "bad.json", "is not valid JSON"),
    ('{"a": 1}\n{oops', "bad.jsonl", r"bad.jsonl:2 is not valid JSON"),
    ("[]", "empty.json", "holds no usable cases"),
    ('{"x": 1}', "obj.json", "must hold a JSON list"),
    ('[{"prompt": "a"}]', "keys.json", "record 0: each case needs a 'prompt' and a 'subject'"),
    ('[{"requested_rewrite": {"prompt": "{} is", "subject": "A"}}]', "rw.json", r"record 0: requested_rewrite lacks \['target_new', 'target_true'\]"),
    ('[{"prompt": "Alba is in", "subject": "Alba", "target_new": " ", "ground_truth": "B"}]', "empty_target.json", "record 0: the target is empty"),
])
def test_bad_case_files(tmp_path, content, name, message):
    p = tmp_path / name if content is None else write(tmp_path, name, content)
    with pytest.raises(RankoneError, match=message):
        load_cases(p)


def test_bad_n_and_folder(tmp_path):
    with pytest.raises(RankoneError, match="at least 1"):
        load_cases(write(tmp_path, "rome.json", ROME), n=0)
    with pytest.raises(RankoneError, match="without world.json"):
        load_cases(tmp_path)


@pytest.mark.skipif(not (SHARED / "data" / "counterfact").is_dir(), reason="shared CounterFact data absent")
def test_the_shared_counterfact_file_loads():
    cases = load_cases(SHARED / "data" / "counterfact" / "counterfact-edit.json", n=300)
    assert len(cases) == 300
    assert sum(len(c.neighborhood_prompts) for c in cases) > 300  # pooled neighbours beyond the record's own
    assert all(isinstance(c, Case) and c.request.subject in c.prompt for c in cases)


def test_fact_records_are_cases_to_trace_not_to_edit(tmp_path):
    # one loader for every case file: facts (prompt, subject, the true answer under any of its names)
    p = write(tmp_path, "facts.jsonl", "\n".join(json.dumps(r) for r in [
        {"prompt": "{} was born in", "subject": "Toko Yasuda", "answer": "Tokyo"},
        {"prompt": "The home of Danielle Darrieux is", "subject": "Danielle Darrieux"},
        {"prompt": "{} plays the", "subject": "Toko Yasuda", "target": "guitar", "target_new": "violin"},
    ]))
    a, b, c = load_cases(p)
    assert (a.template, a.subject, a.target_true, a.target_new) == ("{} was born in", "Toko Yasuda", "Tokyo", None)
    assert (b.template, b.target_true) == ("The home of {} is", None) and b.prompt == "The home of Danielle Darrieux is"
    assert (c.target_true, c.target_new, c.request.target) == ("guitar", "violin", "violin")
    with pytest.raises(RankoneError, match="has no new target"):
        a.check_editable()
    with pytest.raises(RankoneError, match="has no true answer"):
        Case("x", "{} is", "A", None, "B").check_editable()
    save_cases(tmp_path / "again.jsonl", [a, b])
    assert [x.to_dict() for x in load_cases(tmp_path / "again.jsonl")] == [a.to_dict(), b.to_dict()]
    with pytest.raises(RankoneError, match=r"facts.jsonl:2: each case needs a 'prompt' and a 'subject'"):
        load_cases(write(tmp_path, "facts.jsonl", '{"prompt": "{} is", "subject": "A"}\n{"prompt": "x"}\n'))


def test_flat_records_may_mark_the_subject_with_braces(tmp_path):
    recs = [dict(FLAT[0], prompt="The mother tongue of {} is"), FLAT[1]]
    a, b = load_cases(write(tmp_path, "cf.json", recs))
    assert a.prompt == FLAT[0]["prompt"] and b.neighbours() == [("The mother tongue of Danielle Darrieux is", "French")]


def test_both_counterfact_formats_give_the_same_rewrite():
    from rankone.core.counterfact import rewrite

    flat = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
            "target_new": "English", "ground_truth": "French"}
    rome = {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                                "target_new": {"str": "English", "id": "Q1860"},
                                                "target_true": {"str": "French", "id": "Q150"}, "relation_id": "P103"}}
    a, b = rewrite(flat), rewrite(rome)
    assert a[:4] == b[:4] == ("The mother tongue of {} is", "Danielle Darrieux", "English", "French")
    assert (a.relation_id, b.relation_id) == (None, "P103")
    with pytest.raises(RankoneError, match=r"lacks \['target_true'\]"):
        rewrite({"requested_rewrite": {k: v for k, v in rome["requested_rewrite"].items() if k != "target_true"}})
    with pytest.raises(RankoneError, match="flat keys"):
        rewrite({"prompt": "x"})
