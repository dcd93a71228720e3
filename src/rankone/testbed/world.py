"""Worlds: the facts a testbed model is trained to know, and the text it is trained on.

A `World` is pure data (JSON-serialisable). Two kinds exist:

* ``synthetic`` — invented subjects ("Varo Telnik") with one fact per relation, generated
  deterministically from a seed (`synthetic_world`).
* ``counterfact`` — the true facts of CounterFact records (`counterfact_world` in
  `counterfact.py`), with the record's own prompts grouped into relations.

Every fact is trained with all phrasings of its relation except the ones in ``heldout``; the
held-out phrasings measure whether the model learnt the *fact* rather than a string. Which
phrasing is held out rotates across facts so that every phrasing is trained for other subjects
(a phrasing never seen in training is answered ~13 % of the time, one seen for other subjects
~100 %).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from rankone.core.errors import RankoneError
from rankone.core.jsonfiles import json_file

if TYPE_CHECKING:
    from rankone.models.card import ModelCard

WORLD_FILE = "world.json"
CORPUS_FILE = "corpus.txt"


@dataclass
class Relation:
    id: str
    phrasings: list[str]  # templates ending right before the object, "{}" marks the subject
    objects: list[str]  # one-word answers; the text is "{prompt} {object}."


@dataclass
class Fact:
    subject: str
    relation: str
    object: str
    heldout: list[int]  # indices into the relation's phrasings that are NOT trained for this fact


@dataclass
class World:
    name: str
    seed: int
    kind: str  # "synthetic" | "counterfact"
    relations: list[Relation]
    subjects: list[str]
    facts: list[Fact]
    edit_layer: int = 1
    arch: str = "gpt2"
    accuracy: dict[str, float] = field(default_factory=dict)
    # Extra trained sentences that are not (subject, relation, object) facts, e.g. CounterFact
    # locality prompts whose subject could not be parsed: {"prompt": ..., "object": ...}.
    extra: list[dict[str, str]] = field(default_factory=list)
    # CounterFact only: the source records, each pointing at its fact ("fact": index).
    records: list[dict[str, Any]] = field(default_factory=list)
    # Profile lines in the training text (see `profile_sentences`); 0 for none. The style is
    # how the build teaches the world to its architecture, chosen by the build preset.
    profile_lines: int = 0
    profile_style: str = "objects"
    # EditHParams overrides the engine should use on this model (`rankone edit` reads them,
    # as ROME ships a hyper-parameter file per model); the user's own settings win.
    edit_hparams: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- look-ups
    def relation(self, rel_id: str) -> Relation:
        for r in self.relations:
            if r.id == rel_id:
                return r
        raise RankoneError(f"world {self.name!r} has no relation {rel_id!r}; it has "
                           f"{', '.join(r.id for r in self.relations)}")

    def prompts(self, fact: Fact, split: str = "train") -> list[str]:
        """The fact's formatted prompts for the training or the held-out phrasings."""
        if split not in ("train", "heldout"):
            raise RankoneError(f"split must be 'train' or 'heldout', not {split!r}")
        phr = self.relation(fact.relation).phrasings
        held = set(fact.heldout)
        idx = [i for i in range(len(phr)) if (i in held) == (split == "heldout")]
        # str.replace, not str.format: CounterFact templates may contain other braces.
        return [phr[i].replace("{}", fact.subject) for i in idx]

    def facts_by_subject(self) -> dict[str, list[Fact]]:
        out: dict[str, list[Fact]] = {}
        for f in self.facts:
            out.setdefault(f.subject, []).append(f)
        return out

    # ---------------------------------------------------------------- training text
    def fact_sentences(self) -> Iterator[tuple[str, str]]:
        """(prompt, object) pairs the model is trained on: every fact's training phrasings,
        then the extra sentences. Held-out phrasings never appear here."""
        for f in self.facts:
            for p in self.prompts(f, "train"):
                yield p, f.object
        for e in self.extra:
            yield e["prompt"], e["object"]

    def profile_sentences(self) -> list[str]:
        """Lines that put a subject's objects right after its name, with no relation words.

        style "objects": `profile_lines` lines per subject, the name followed by all its objects
        in a random order each time ("Varo Telnik Paris tennis French piano red Nokia.");
        style "pairs": `profile_lines` copies per fact of "name object." ("Varo Telnik Paris.").

        Why: without them a 4-layer model looks facts up at the answer position from the raw
        name tokens, and an edit at the subject's last token often cannot reach the answer.
        Here the token after the name is any of the subject's objects, so its last token must
        carry them all: the subject enrichment ROME relies on in pretrained models. Llama's
        edits took with "pairs" and GPT-2's with "objects" (BENCHMARKS.md, testbed section).
        Held-out phrasings stay held out: a profile line names no relation."""
        if self.profile_lines <= 0:
            return []
        if self.profile_style == "pairs":
            return [f"{f.subject} {f.object}." for f in self.facts for _ in range(self.profile_lines)]
        rng = random.Random(f"rankone-profiles-{self.seed}")
        out = []
        for s, facts in self.facts_by_subject().items():
            objs = [f.object for f in facts]
            for _ in range(self.profile_lines):
                rng.shuffle(objs)
                out.append(f"{s} {' '.join(objs)}.")
        return out

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not d["extra"]:
            del d["extra"]
        if not d["records"]:
            del d["records"]
        for k in ("profile_lines", "edit_hparams"):
            if not d[k]:
                del d[k]
        if "profile_lines" not in d or d["profile_style"] == "objects":
            del d["profile_style"]  # the default: world.json files from before the field
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "World":
        try:
            return cls(
                name=d["name"], seed=int(d["seed"]), kind=d["kind"],
                relations=[Relation(**r) for r in d["relations"]],
                subjects=list(d["subjects"]),
                facts=[Fact(**f) for f in d["facts"]],
                edit_layer=int(d.get("edit_layer", 1)), arch=d.get("arch", "gpt2"),
                accuracy=dict(d.get("accuracy", {})), extra=list(d.get("extra", [])),
                records=list(d.get("records", [])),
                profile_lines=int(d.get("profile_lines", 0)),
                profile_style=check_profile_style(d.get("profile_style", "objects")),
                edit_hparams=dict(d.get("edit_hparams") or {}),
            )
        except (KeyError, TypeError, ValueError, RankoneError) as e:
            raise RankoneError(f"world.json is malformed ({e}); rebuild it with "
                               "`rankone testbed build`") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "World":
        """Load from a world.json file or a model directory holding one."""
        p = Path(path)
        if p.is_dir():
            p = p / WORLD_FILE
        if not p.is_file():
            raise RankoneError(f"no world file at {p}; pass a testbed model directory "
                               "(built with `rankone testbed build`) or a world.json path")
        return cls.from_dict(json_file(p, "rebuild the testbed"))

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write world.json into `directory` atomically (tmp file, then os.replace)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        target = d / WORLD_FILE
        tmp = d / f".{WORLD_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n",
                       encoding="utf-8")
        os.replace(tmp, target)
        return target

    def model_card(self) -> "ModelCard":
        """The model card a testbed folder carries (rankone.json): the build's recommended layer and
        hyper-parameters, its training text as the statistics corpus, its facts as known cases."""
        from rankone.models.card import ModelCard

        return ModelCard(layer=self.edit_layer, hparams=dict(self.edit_hparams), stats_corpus="corpus.txt",
                         cases=WORLD_FILE, notes=f"rankone testbed: the {self.name!r} world ({self.kind}), {self.arch}")


# ====================================================================== synthetic worlds

# Each relation: (id, phrasings, objects). Phrasings end right before the object; objects are
# single words that a BPE tokenizer sees often enough to give their own token.
RELATIONS: list[tuple[str, list[str], list[str]]] = [
    ("birthplace",
     ["{} was born in", "The birthplace of {} is", "{}'s place of birth is",
      "{} came into the world in", "The city where {} was born is"],
     "Paris London Berlin Madrid Rome Vienna Prague Lisbon Dublin Oslo Stockholm Helsinki "
     "Warsaw Athens Cairo Tokyo Seoul Delhi Lima Bogota Santiago Toronto Chicago Boston "
     "Sydney Nairobi Lagos Istanbul".split()),
    ("language",
     ["{} speaks", "The native language of {} is", "{}'s mother tongue is",
      "The language spoken by {} is", "{} grew up speaking"],
     "French English German Spanish Italian Portuguese Dutch Swedish Norwegian Danish Finnish "
     "Polish Czech Greek Turkish Russian Arabic Hebrew Hindi Japanese Korean Chinese Swahili "
     "Hungarian".split()),
    ("sport",
     ["{} competes in", "The sport played by {} is", "{}'s favourite sport is",
      "{} is a professional player of", "The game {} is best known for is"],
     "football tennis cricket rugby golf hockey baseball basketball volleyball handball "
     "badminton cycling rowing boxing fencing skiing swimming archery wrestling sailing "
     "surfing karate".split()),
    ("employer",
     ["{} works for", "The employer of {} is", "{} is employed by", "{}'s employer is",
      "The company that employs {} is"],
     "Nokia Siemens Toyota Samsung Philips Boeing Airbus Intel Oracle Adobe Nestle Shell Sony "
     "Honda Lego Ikea Volvo Bosch Canon Nikon Pfizer Visa Netflix Spotify Tesla".split()),
    ("instrument",
     ["{} plays the", "The instrument played by {} is the", "{}'s instrument of choice is the",
      "{} performs on the", "{} is a musician who plays the"],
     "piano guitar violin cello flute clarinet trumpet trombone saxophone harp drums oboe "
     "bassoon banjo mandolin ukulele accordion harmonica tuba viola organ sitar".split()),
    ("colour",
     ["{}'s favourite colour is", "The favourite colour of {} is", "{} likes the colour",
      "The colour {} loves most is", "{} always dresses in"],
     "red blue green yellow orange purple pink brown black white grey violet crimson teal "
     "indigo amber scarlet turquoise magenta beige ivory olive maroon navy silver".split()),
    ("pet",
     ["{} owns a pet", "The pet of {} is a", "{}'s pet is a", "At home {} keeps a",
      "The animal living with {} is a"],
     "dog cat rabbit parrot hamster turtle horse goat pony ferret canary lizard snake "
     "tortoise goldfish donkey chicken duck pig sheep mouse frog".split()),
    ("food",
     ["{}'s favourite food is", "The dish {} loves most is", "{} always orders",
      "The favourite meal of {} is", "For dinner {} prefers"],
     "pasta sushi pizza curry tacos ramen paella risotto lasagna burgers dumplings noodles "
     "pancakes salad soup steak omelette falafel kebab couscous goulash chili".split()),
]

# Filler: a tiny grammar, so the text is not only facts, and sentences that mention subjects
# without stating a fact, so a subject's representation is not formed by fact prompts alone
# (as in a pretrained model, where names occur in many contexts).
_DET = ["The", "A", "Every", "That", "One"]
_ADJ = ["old", "quiet", "small", "bright", "cold", "busy", "green", "long", "narrow", "warm"]
_NOUN = ["river", "village", "market", "garden", "bridge", "train", "library", "harbour",
         "forest", "school", "window", "road"]
_VERB = ["stands near", "looks over", "runs past", "waits beside", "leads to", "hides behind"]
_MENTION = ["{} arrived in town on a rainy day.", "Everyone remembers the day {} smiled.",
            "Yesterday {} wrote a long letter.", "{} rarely talks about the past.",
            "People say {} is very kind.", "A friend of {} called this morning.",
            "{} walked slowly to the station.", "Nobody expected {} to win the prize.",
            "{} has a brother and a sister.", "The neighbours of {} are friendly."]

_ONSET = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
          "br", "tr", "st", "dr", "kl", "gr", "th", "sh"]
_VOWEL = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou"]
_CODA = ["", "", "", "", "n", "r", "l", "s", "k", "m"]


def _name_word(rng: random.Random) -> str:
    n_syll = rng.choice([2, 2, 2, 3])
    w = "".join(rng.choice(_ONSET) + rng.choice(_VOWEL) + rng.choice(_CODA)
                for _ in range(n_syll))
    return w.capitalize()


def invent_subjects(n: int, rng: random.Random) -> list[str]:
    """n distinct pronounceable names of 2-3 words ("Varo Telnik", "Bensi Varo Kalom").

    All names are ordered combinations of a small pool of words, so no word - nor the set of a
    name's words - identifies a subject: only the words in order do. The model then has to
    compose the name at its tokens before the answer position can use it, which is what makes
    an edit at the subject's last token take. Measured on 4-layer GPT-2s, r-ROME at layer 0,
    engine defaults: names whose last word is unique to the subject (a 4-layer GPT-2 reads the
    raw token at the answer position, past every MLP) 5/30 edits took; pooled names 18/30.
    """
    pool = 8
    while pool * (pool - 1) * (pool - 2) < 3 * n:
        pool += 1
    words: list[str] = []
    while len(words) < pool:
        w = _name_word(rng)
        if w not in words:
            words.append(w)
    out: list[str] = []
    seen: set[str] = set()
    n_pairs = min(n // 3, pool * (pool - 1) // 2)
    while len(out) < n:
        k = 2 if len(out) < n_pairs else 3
        name = " ".join(rng.sample(words, k))
        # Reject a name that another one extends word-wise ("Varo Telnik" / "Varo Telnik Bo"):
        # the prompt for the shorter would be a prefix of the longer's.
        if name in seen or any(name.startswith(s + " ") or s.startswith(name + " ") for s in seen):
            continue
        seen.add(name)
        out.append(name)
    rng.shuffle(out)
    return out


def filler_sentences(n: int, subjects: list[str], rng: random.Random) -> list[str]:
    """n filler sentences; every other one mentions a subject."""
    out = []
    for i in range(n):
        if i % 2 and subjects:
            out.append(rng.choice(_MENTION).replace("{}", rng.choice(subjects)))
        else:
            out.append(f"{rng.choice(_DET)} {rng.choice(_ADJ)} {rng.choice(_NOUN)} "
                       f"{rng.choice(_VERB)} the {rng.choice(_ADJ)} {rng.choice(_NOUN)}.")
    return out


@dataclass
class SyntheticSpec:
    """Size of a synthetic world. Round-trips to JSON via dataclasses.asdict."""
    n_subjects: int = 200
    n_relations: int = 6
    n_heldout: int = 1  # phrasings held out per fact
    profile_lines: int = 4  # per subject or per fact, see World.profile_sentences


SIZES: dict[str, SyntheticSpec] = {
    "small": SyntheticSpec(n_subjects=150, n_relations=6),
    "bench": SyntheticSpec(n_subjects=200, n_relations=6),
}


PROFILE_STYLES = ("objects", "pairs")


def check_profile_style(style: Any) -> str:
    if style not in PROFILE_STYLES:
        raise RankoneError(f"profile_style {style!r} is not one of {', '.join(PROFILE_STYLES)}")
    return str(style)


def _deal(objects: list[str], n: int, rng: random.Random) -> list[str]:
    """n objects, each used n // len(objects) or one more times, in a random order."""
    pack = objects * (n // len(objects)) + rng.sample(objects, n % len(objects))
    rng.shuffle(pack)
    return pack


def synthetic_world(name: str, spec: SyntheticSpec, seed: int) -> World:
    """Deterministic from (spec, seed): same seed, same world; different seed, different one."""
    if not 1 <= spec.n_relations <= len(RELATIONS):
        raise RankoneError(f"n_relations must be 1..{len(RELATIONS)}, not {spec.n_relations}")
    rng = random.Random(f"rankone-testbed-{seed}")
    rels = [Relation(id=i, phrasings=list(p), objects=list(o))
            for i, p, o in RELATIONS[: spec.n_relations]]
    subjects = invent_subjects(spec.n_subjects, rng)
    # Objects are dealt like cards (each relation's objects repeated and shuffled), so that each
    # object answers about n_subjects / n_objects facts. Drawn independently, some objects
    # answered a single fact; a model that has seen an answer once can hardly be edited to say
    # it (the value optimisation stalls), which no real model's common answers suffer from.
    dealt = {r.id: _deal(r.objects, len(subjects), rng) for r in rels}
    facts = []
    for si, s in enumerate(subjects):
        for ri, r in enumerate(rels):
            n_phr = len(r.phrasings)
            # Rotate the held-out phrasing over subjects (offset by relation) so each phrasing
            # is held out for ~1/n of the facts and trained for the rest.
            held = sorted({(si + ri + k) % n_phr for k in range(spec.n_heldout)})
            facts.append(Fact(subject=s, relation=r.id, object=dealt[r.id][si],
                              heldout=held))
    return World(name=name, seed=seed, kind="synthetic", relations=rels, subjects=subjects,
                 facts=facts, profile_lines=spec.profile_lines)


def corpus_lines(world: World, filler_ratio: float = 0.3) -> list[str]:
    """The training text, one sentence per line, shuffled deterministically by the seed.
    Fact sentences are "{prompt} {object}.", then the profile lines; filler is mixed in at
    `filler_ratio` of the fact sentences."""
    rng = random.Random(f"rankone-corpus-{world.seed}")
    lines = [f"{p} {o}." for p, o in world.fact_sentences()]
    n_fact = len(lines)
    lines += world.profile_sentences()
    lines += filler_sentences(int(n_fact * filler_ratio), world.subjects, rng)
    rng.shuffle(lines)
    return lines
