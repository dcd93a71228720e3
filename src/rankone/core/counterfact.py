"""The two CounterFact record formats, read in one place.

* flat (EasyEdit-style, `counterfact-edit.json`): case_id, prompt (the subject written in),
  subject, target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth;
* original ROME: case_id, requested_rewrite {prompt (with `{}`), subject, target_new {str, id},
  target_true {str, id}, relation_id}, paraphrase_prompts, neighborhood_prompts, ...

`rewrite(record)` gives what both share: the template (with `{}` for the subject), the subject,
the new and the true target, and the relation id where the record has one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from rankone.core.errors import RankoneError

FLAT_KEYS = ("prompt", "subject", "target_new", "ground_truth")
ROME_KEYS = ("prompt", "subject", "target_new", "target_true")


class Rewrite(NamedTuple):
    template: str  # the prompt with {} where the subject goes
    subject: str
    target_new: str
    target_true: str
    relation_id: str | None


def target_str(x: Any) -> str:
    """A target: {"str": ..., "id": ...} in the ROME format, a plain string in the flat one."""
    if isinstance(x, dict):
        x = x.get("str", "")
    return str(x).strip()


def is_rome(rec: dict[str, Any]) -> bool:
    return isinstance(rec.get("requested_rewrite"), dict)


def is_flat(rec: dict[str, Any]) -> bool:
    return all(k in rec for k in FLAT_KEYS)


def rewrite(rec: dict[str, Any]) -> Rewrite:
    """The edit a record asks for, from either format; one line naming what is missing otherwise."""
    if is_rome(rec):
        rw = rec["requested_rewrite"]
        missing = [k for k in ROME_KEYS if k not in rw]
        if missing:
            raise RankoneError(f"requested_rewrite lacks {missing}")
        return Rewrite(str(rw["prompt"]), str(rw["subject"]), target_str(rw["target_new"]),
                       target_str(rw["target_true"]), rw.get("relation_id"))
    if is_flat(rec):
        subject, prompt = str(rec["subject"]), str(rec["prompt"])
        template = prompt if "{}" in prompt else prompt.replace(subject, "{}", 1)
        return Rewrite(template, subject, target_str(rec["target_new"]), target_str(rec["ground_truth"]),
                       rec.get("relation_id"))
    raise RankoneError(f"a CounterFact record needs the flat keys ({', '.join(FLAT_KEYS)}) or a "
                       f"'requested_rewrite'; it has keys {sorted(rec)[:8]}")
