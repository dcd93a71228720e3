"""Cases: a fact the model knows and, for evaluation, the edit that changes it.

A `Case` is what the ROME paper's CounterFact record holds: the prompt (with `{}` for the subject),
the subject, the true answer, the new target, paraphrase prompts (the same fact phrased otherwise),
neighbourhood prompts (other subjects whose answer must not change, each with its own true answer)
and generation prompts (for fluency). A case without a new target is a fact to trace (causal
tracing needs only prompt, subject and, optionally, the true answer). `load_cases` reads:

* flat CounterFact (`case_id, prompt, subject, target_new, ground_truth, rephrase_prompt,
  locality_prompt, locality_ground_truth`): one paraphrase and one neighbour per record; more
  neighbours are taken from other records of the same file with the same template and the same
  true answer (which is how CounterFact's own neighbourhood prompts were chosen);
* original ROME CounterFact (`requested_rewrite {prompt, subject, target_new, target_true}`,
  `paraphrase_prompts`, `neighborhood_prompts`, `generation_prompts`);
* facts: `{prompt, subject}` with the true answer as `answer` / `ground_truth` / `target_true` /
  `target` (first present; none: the model's own answer) and optionally `target_new`;
* testbed worlds (world.json or the model folder holding it): held-out phrasings as paraphrases,
  other subjects with the same relation (preferably the same object) as neighbours;
* files of `Case.to_dict()` records (what `save_cases` writes).

Bad input is one `RankoneError` line; CounterFact records whose subject is not in the prompt are
skipped (CounterFact has a few) and counted in the log.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from rankone.core.counterfact import FLAT_KEYS, is_flat, rewrite, target_str
from rankone.core.errors import RankoneError
from rankone.core.jsonfiles import json_file, json_lines
from rankone.core.tokens import EditRequest
from rankone.models.handle import ModelHandle
from rankone.trace.layer_choice import FactSet
from rankone.trace.tracing import SubjectPrompt

# When a case counts as known by the unedited model (`metrics.knows`): the true answer is its greedy
# first token, or P(true) > P(new) on the prompt.
KNOWN_RULES = ("greedy", "over-new")

log = logging.getLogger(__name__)

ANSWER_KEYS = ("answer", "ground_truth", "target_true", "target")  # a fact record's true answer: first present wins


@dataclass
class Case:
    case_id: str
    template: str  # the prompt, with {} where the subject goes
    subject: str
    target_true: str | None  # the true answer; None: the model's own greedy answer (tracing only)
    target_new: str | None = None  # the edit's new object; None: a fact to trace, not an edit
    paraphrase_prompts: list[str] = field(default_factory=list)  # full text, subject filled in
    neighborhood_prompts: list[str] = field(default_factory=list)
    neighborhood_targets: list[str] = field(default_factory=list)  # the true answer of each neighbour
    generation_prompts: list[str] = field(default_factory=list)
    relation: str | None = None

    @classmethod
    def of(cls, case_id: str, request: EditRequest, target_true: str | None, paraphrase_prompts: Sequence[str] = (),
           neighborhood_prompts: Sequence[str] = (), neighborhood_targets: Sequence[str] = (),
           generation_prompts: Sequence[str] = (), relation: str | None = None) -> "Case":
        """An evaluation case from its edit request (prompt template, subject, new target)."""
        return cls(case_id, request.prompt, request.subject, target_true, request.target, list(paraphrase_prompts),
                   list(neighborhood_prompts), list(neighborhood_targets), list(generation_prompts), relation)

    @property
    def request(self) -> EditRequest:
        """The edit; a case without a new target has none (one line saying so)."""
        if self.target_new is None:
            raise RankoneError(f"case {self.case_id!r} ({self.prompt!r}) has no new target: it is a fact to trace, "
                               "not an edit; give target_new")
        return EditRequest(self.template, self.subject, self.target_new)

    @property
    def prompt(self) -> str:
        """The prompt with the subject filled in."""
        return self.template.replace("{}", self.subject, 1)

    def check_editable(self) -> None:
        """Refuse a case that cannot be evaluated as an edit (no new target or no true answer)."""
        self.request  # noqa: B018  (raises without a new target)
        if self.target_true is None:
            raise RankoneError(f"case {self.case_id!r} ({self.prompt!r}) has no true answer (ground_truth): "
                               "evaluating an edit compares the new target with it")

    def neighbours(self) -> list[tuple[str, str]]:
        return list(zip(self.neighborhood_prompts, self.neighborhood_targets))

    def to_dict(self) -> dict[str, Any]:
        if self.target_new is None:  # a fact record
            return {"case_id": self.case_id, "prompt": self.template, "subject": self.subject, "answer": self.target_true}
        return {"case_id": self.case_id, "request": self.request.to_dict(), "target_true": self.target_true,
                "paraphrase_prompts": self.paraphrase_prompts, "neighborhood_prompts": self.neighborhood_prompts,
                "neighborhood_targets": self.neighborhood_targets, "generation_prompts": self.generation_prompts,
                "relation": self.relation}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Case":
        req = EditRequest.from_dict(d["request"])
        nb_p, nb_t = list(d.get("neighborhood_prompts", [])), list(d.get("neighborhood_targets", []))
        if len(nb_p) != len(nb_t):
            raise RankoneError(f"case {d.get('case_id')!r}: {len(nb_p)} neighbourhood prompts but {len(nb_t)} targets")
        return cls.of(str(d.get("case_id", "")), req, target_str(d["target_true"]), list(d.get("paraphrase_prompts", [])),
                      nb_p, nb_t, list(d.get("generation_prompts", [])), d.get("relation"))


def fact_case(r: dict[str, Any], case_id: str) -> Case:
    """A fact record: prompt and subject, the true answer under one of ANSWER_KEYS (or none), and
    optionally target_new. CounterFact records missing their ground truth read this way too."""
    if not isinstance(r.get("prompt"), str) or not isinstance(r.get("subject"), str):
        raise RankoneError("each case needs a 'prompt' and a 'subject' (and the true 'answer'), or the CounterFact "
                           f"fields ({', '.join(FLAT_KEYS)}) or a requested_rewrite; it has keys {sorted(r)[:8]}")
    answer = next((r[k] for k in ANSWER_KEYS if k in r), None)
    if isinstance(answer, dict):
        answer = answer.get("str")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise RankoneError("the answer must be a non-empty string")
    new = r.get("target_new")
    new = target_str(new) if new is not None else None
    req = EditRequest.create(r["prompt"], r["subject"], new or "x")  # validates prompt and subject
    return Case(str(r.get("case_id", case_id)), req.prompt, req.subject, answer.strip() if answer else None, new,
                generation_prompts=[req.text()[0]])


def _prompt_of(x: Any) -> str:
    return str(x["prompt"] if isinstance(x, dict) else x)


# ---- CounterFact --------------------------------------------------------------------------


def rome_case(rec: dict[str, Any]) -> Case:
    """A case from an original ROME-format CounterFact record."""
    rw = rewrite(rec)
    subj, true = rw.subject, rw.target_true
    req = EditRequest.create(rw.template, subj, rw.target_new)
    nb = [_prompt_of(p) for p in rec.get("neighborhood_prompts", [])]
    # ROME's neighbourhood prompts share the case's true object (that is how they were chosen);
    # a dict entry may name its own target.
    nb_t = [target_str(p.get("target", true)) if isinstance(p, dict) else true for p in rec.get("neighborhood_prompts", [])]
    gens = [str(g) for g in rec.get("generation_prompts", [])] or [req.text()[0], f"{subj} is"]
    return Case.of(str(rec.get("case_id", "")), req, true, [_prompt_of(p) for p in rec.get("paraphrase_prompts", [])],
                   nb, nb_t, gens, rw.relation_id)


def _template(rec: dict[str, Any]) -> str:
    return rewrite(rec).template


def _filled(rec: dict[str, Any]) -> str:
    """The record's prompt with the subject written in (CounterFact writes it in; a `{}` is filled)."""
    return str(rec["prompt"]).replace("{}", str(rec["subject"]), 1)


def flat_cases(records: list[dict[str, Any]], n_neighbours: int = 10) -> list[Case]:
    """Cases from flat CounterFact records; neighbours pooled by (template, true answer)."""
    pool: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for r in records:
        pool.setdefault((_template(r), target_str(r["ground_truth"])), []).append((str(r["subject"]), _filled(r)))
    out = []
    for r in records:
        subj, true = str(r["subject"]), target_str(r["ground_truth"])
        req = EditRequest.create(str(r["prompt"]), subj, target_str(r["target_new"]))
        nb: list[tuple[str, str]] = []
        if r.get("locality_prompt") and r.get("locality_ground_truth"):
            nb.append((str(r["locality_prompt"]), target_str(r["locality_ground_truth"])))
        for s, p in pool[(_template(r), true)]:
            if len(nb) >= n_neighbours:
                break
            if s != subj and p not in (q for q, _ in nb):
                nb.append((p, true))
        para = [str(r["rephrase_prompt"])] if r.get("rephrase_prompt") else []
        out.append(Case.of(str(r.get("case_id", len(out))), req, true, para, [p for p, _ in nb], [t for _, t in nb],
                           [req.text()[0], f"{subj} is"], r.get("relation")))
    return out


def cases_from_records(records: list[Any], source: str = "cases", n_neighbours: int = 10,
                       where: Any = None) -> list[Case]:
    """Detect each record's format (ROME, flat CounterFact, Case, fact) and build the cases.
    `where(i)` names record i in messages (e.g. 'file.jsonl:3'); default '{source}: record {i}'."""
    flat: list[dict[str, Any]] = []
    out: list[Case] = []
    skipped = 0
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise RankoneError(f"{source}: record {i} is not a JSON object")
        try:
            if "requested_rewrite" in r:
                out.append(rome_case(r))  # rewrite() names what a malformed one lacks
            elif "request" in r and "target_true" in r:
                out.append(Case.from_dict(r))
            elif is_flat(r):
                if str(r["subject"]) not in _filled(r):
                    skipped += 1  # a known CounterFact quirk: the subject is spelt otherwise in the prompt
                    continue
                EditRequest.create(str(r["prompt"]), str(r["subject"]), target_str(r["target_new"]))  # validate here, with i
                flat.append(r)
            else:
                out.append(fact_case(r, str(i)))
        except RankoneError as e:
            raise RankoneError(f"{where(i) if where else f'{source}: record {i}'}: {e}") from None
    if flat:
        out += flat_cases(flat, n_neighbours)
    if skipped:
        log.warning("%s: skipped %d record(s) whose subject is not in the prompt", source, skipped)
    return out


# ---- testbed worlds -------------------------------------------------------------------------


def cases_from_world(world: Any, seed: int = 0, n_neighbours: int = 5) -> list[Case]:
    """One case per fact of a testbed world, ordered so that consecutive cases change subject.

    The order goes round the subjects (shuffled by `seed`), one fact each, rotating the
    relation, so the first len(subjects) cases edit every subject once; a sequential run then
    edits a subject again only after all others. The new target is another object of the
    relation; neighbours are other subjects' facts of the same relation, those with the same
    true object first (as in CounterFact), never ones whose answer is the new target.
    """
    if getattr(world, "kind", "") == "counterfact" and getattr(world, "records", None):
        return cases_from_records(list(world.records), f"world {world.name}", n_neighbours)
    rng = random.Random(f"rankone-cases-{seed}")
    rels = {r.id: r for r in world.relations}
    by_subj = world.facts_by_subject()
    subjects = list(by_subj)
    rng.shuffle(subjects)
    by_rel: dict[str, list[Any]] = {}
    for f in world.facts:
        by_rel.setdefault(f.relation, []).append(f)
    order = []
    for rnd in range(max(len(v) for v in by_subj.values())):
        for si, s in enumerate(subjects):
            fs = by_subj[s]
            if rnd < len(fs):
                order.append(fs[(si + rnd) % len(fs)])
    out = []
    for f in order:
        rel = rels[f.relation]
        others = [o for o in rel.objects if o != f.object]
        if not others:
            continue
        target = rng.choice(others)
        train = [i for i in range(len(rel.phrasings)) if i not in set(f.heldout)]
        template = rel.phrasings[train[0] if train else 0]
        req = EditRequest.create(template, f.subject, target)
        cands = [g for g in by_rel[f.relation] if g.subject != f.subject and g.object != target]
        same = [g for g in cands if g.object == f.object]
        rest = [g for g in cands if g.object != f.object]
        rng.shuffle(same)
        rng.shuffle(rest)
        nb = (same + rest)[:n_neighbours]
        nb_prompts = []
        for j, g in enumerate(nb):  # a phrasing each neighbour was trained on, rotating
            tr = [i for i in range(len(rel.phrasings)) if i not in set(g.heldout)] or [0]
            nb_prompts.append(rel.phrasings[tr[j % len(tr)]].replace("{}", g.subject))
        other = [g for g in by_subj[f.subject] if g.relation != f.relation]
        gens = [req.text()[0]] + [rels[g.relation].phrasings[0].replace("{}", f.subject) for g in other[:1]]
        out.append(Case.of(f"{f.subject}|{f.relation}", req, f.object, world.prompts(f, "heldout"), nb_prompts,
                           [g.object for g in nb], gens, f.relation))
    return out


def heldout_text(world: Any, max_sentences: int = 400, seed: int = 0) -> str:
    """Text the testbed model never saw verbatim: facts in their held-out phrasings."""
    pairs = [(p, f.object) for f in world.facts for p in world.prompts(f, "heldout")]
    random.Random(f"rankone-heldout-{seed}").shuffle(pairs)
    # one line of sentences joined by spaces: how the testbed corpus rows read (no newlines in training)
    return " ".join(f"{p} {o}." for p, o in pairs[:max_sentences])


# ---- files ----------------------------------------------------------------------------------


def _read_records(p: Path) -> tuple[list[Any], list[str]]:
    """The records of a .json list or a .jsonl file, and how to name each in a message."""
    if p.suffix == ".jsonl":
        rows = json_lines(p, "one case object per line", objects=False)
        return [v for _, v in rows], [w for w, _ in rows]
    data = json_file(p, "give a CounterFact file, a .jsonl of cases or a testbed world.json")
    if isinstance(data, dict) and "cases" in data:
        data = data["cases"]
    if isinstance(data, dict) and "facts" in data and "relations" in data:
        return [data], [str(p)]  # a world; handled by the caller
    if not isinstance(data, list):
        raise RankoneError(f"{p} must hold a JSON list of case records (CounterFact flat or ROME format, or facts)")
    return data, [f"{p}: record {i}" for i in range(len(data))]


def load_cases(path: str | os.PathLike, n: int | None = None, seed: int = 0) -> list[Case]:
    """Cases from a CounterFact file (flat or ROME; .json or .jsonl), a file of Case or fact records,
    or a testbed world (its world.json or the model folder holding it). `n` keeps the first n."""
    p = Path(path)
    if n is not None and n < 1:
        raise RankoneError(f"the number of cases must be at least 1, not {n}")
    if p.is_dir():
        if not (p / "world.json").is_file():
            raise RankoneError(f"{p} is a folder without world.json; give a cases file or a testbed model folder")
        p = p / "world.json"
    if not p.is_file():
        raise RankoneError(f"cases file {p} does not exist; give a CounterFact .json/.jsonl or a testbed world.json")
    recs, names = _read_records(p)
    if len(recs) == 1 and isinstance(recs[0], dict) and "facts" in recs[0] and "relations" in recs[0]:
        from rankone.testbed.world import World

        cases = cases_from_world(World.from_dict(recs[0]), seed=seed)
    else:
        cases = cases_from_records(recs, str(p), where=names.__getitem__)
    if not cases:
        raise RankoneError(f"{p} holds no usable cases")
    return cases[:n] if n is not None else cases


def heldout_text_of(path: str | os.PathLike | None) -> str | None:
    """Held-out text for perplexity when `path` is a testbed world (world.json or its folder), else None."""
    if path is None:
        return None
    p = Path(path)
    p = p / "world.json" if p.is_dir() else p
    if p.name != "world.json" or not p.is_file():
        return None
    from rankone.testbed.world import World

    return heldout_text(World.load(p))


def save_cases(path: str | os.PathLike, cases: Iterable[Case]) -> None:
    from rankone.core.atomic import write_bytes

    write_bytes(path, "".join(json.dumps(c.to_dict(), ensure_ascii=False) + "\n" for c in cases).encode())


def edited_by(cases: list[Case], requests: list[dict[str, str]]) -> tuple[list[bool], list[bool]]:
    """Per case: is its request one of the patch's (`edited`), and does a patch edit rewrite the
    same fact (same subject and prompt, maybe another target)? Spacing and case are ignored."""
    def fact(r: dict[str, str]) -> tuple[str, str]:
        return " ".join(r.get("subject", "").lower().split()), " ".join(r.get("prompt", "").lower().split())

    exact = {(fact(r), " ".join(r.get("target", "").lower().split())) for r in requests}
    facts = {f for f, _ in exact}
    out_exact, out_fact = [], []
    for c in cases:
        r = c.request.to_dict()
        out_exact.append((fact(r), " ".join(r["target"].lower().split())) in exact)
        out_fact.append(fact(r) in facts)
    return out_exact, out_fact


def fact_set(path: str | os.PathLike, source: str | None = None) -> FactSet:
    """The facts of a case file (any format `load_cases` reads) as tracing takes them."""
    cases = load_cases(path)
    facts = [SubjectPrompt(c.template, c.subject, c.target_true) for c in cases]
    return FactSet(facts, list(dict.fromkeys(c.subject for c in cases)), source or str(path))


def known_fact_set(handle: ModelHandle) -> FactSet | None:
    """The facts the model card says the model knows (its `cases` file) as a FactSet, or None."""
    p = handle.cases_file()
    return fact_set(p, f"{p} (the model card's cases)") if p is not None else None
