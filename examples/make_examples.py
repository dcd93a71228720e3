"""Write the example files the README's commands read (examples/builtin/, examples/smollm2/).

    python examples/make_examples.py                 # both; SmolLM2's cases need the CounterFact file
    python examples/make_examples.py --only builtin

builtin/ (the built-in testbed model): the README's edit (Stoukthen Fokai Thathai born in Lisbon)
and two more as requests; cases from its world, the README's edit first; a validation suite for
the README's edit: the target, facts of other subjects the edit must keep, held-out text.
smollm2/ (SmolLM2-135M-Instruct): the README's Eiffel Tower edit and two more as requests; the
Eiffel Tower case and the first CounterFact cases the model knows (P(true) > P(new)); a
validation suite for the Eiffel Tower edit. Keep checks are facts the unedited model answers
with a wide margin (its answer's probability ≥ KEEP_MIN_P) that the default gate policy passes
after the README's edit (checked when the files are written, so the README's validation passes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COUNTERFACT = next((q / "shared" / "data" / "counterfact" / "counterfact-edit.json" for q in ROOT.parents
                    if (q / "shared" / "data").is_dir()), ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json")
KEEP_MIN_P = 0.5
EIFFEL = {"case_id": "eiffel", "prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower",
          "target_new": "Rome", "ground_truth": "Paris",
          "rephrase_prompt": "To visit the Eiffel Tower, you have to travel to",
          "locality_prompt": "The Louvre is located in the city of", "locality_ground_truth": "Paris"}


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _keeps(model, tok, prompts: list[str], n: int, patches: list = ()) -> list[dict]:
    """Keep checks: prompts whose greedy answer the model gives with probability ≥ KEEP_MIN_P and
    that the default gate policy passes after each of the edit's patches."""
    from rankone.lifecycle.gates import GatePolicy, Suite, parse_check, run_gates
    from rankone.models.generation import first_word, greedy, target_logprob

    out = []
    for p in prompts:
        answer = first_word(greedy(model, tok, p, 4))
        if not answer or math.exp(target_logprob(model, tok, p, answer)) < KEEP_MIN_P:
            continue
        check = {"type": "keep", "prompt": p}
        suite = Suite([parse_check(check, "keep", HERE)])
        if all(run_gates(model, tok, patch, suite, GatePolicy(), []).passed for patch in patches):
            out.append(check)
        if len(out) == n:
            break
    return out


def builtin() -> None:
    from rankone.core.tokens import EditRequest
    from rankone.edit.editor import Editor
    from rankone.eval.cases import cases_from_world
    from rankone.models.load import load_model
    from rankone.testbed import World, builtin_model_dir

    d = builtin_model_dir()
    world = World.load(d)
    handle = load_model(d)
    out = HERE / "builtin"
    out.mkdir(exist_ok=True)
    cases = cases_from_world(world, seed=0)
    first = next(c for c in cases if c.subject == "Stoukthen Fokai Thathai" and c.template == "{} was born in")
    first.target_new = "Lisbon"  # the README's edit
    rest = [c for c in cases if c is not first][:119]
    (out / "cases.json").write_text(json.dumps([c.to_dict() for c in [first, *rest]], indent=1, ensure_ascii=False) + "\n")
    _jsonl(out / "edits.jsonl", [c.request.to_dict() for c in [first, *rest[:2]]])
    # held-out text and keep checks about other subjects: the subject's own facts are the edit's business
    others = [f for f in world.facts if f.subject != first.subject]
    sentences = [f"{q} {f.object}." for f in others for q in world.prompts(f, "heldout")]
    (out / "heldout.txt").write_text(" ".join(sentences[::15][:60]) + "\n")
    patch = Editor(handle, progress=False).edit([EditRequest.create(first.template, first.subject, "Lisbon")])
    asks = [world.relation(f.relation).phrasings[0].replace("{}", f.subject) for f in others[::7]]
    _jsonl(out / "checks.jsonl", [{"type": "target", "prompt": first.prompt, "target": "Lisbon"},
                                  *_keeps(handle.model, handle.tokenizer, asks, 3, [patch]),
                                  {"type": "perplexity", "text_file": "heldout.txt"}])


def smollm2(sizes: list[int], cache: str | None) -> None:
    from rankone.core.tokens import EditRequest
    from rankone.edit.editor import Editor
    from rankone.eval.cases import load_cases
    from rankone.eval.protocol import select_cases
    from rankone.models.load import load_model
    from rankone.models.zoo import real_model_gguf

    handle = load_model(real_model_gguf("smollm2-135m"))
    model, tok = handle
    out = HERE / "smollm2"
    out.mkdir(exist_ok=True)
    records = {str(r["case_id"]): r for r in json.loads(COUNTERFACT.read_text())}
    known, _ = select_cases(model, tok, load_cases(COUNTERFACT), known_only="over-new", limit=40)
    cf = [records[c.case_id] for c in known[:40]]
    (out / "cases.json").write_text(json.dumps([EIFFEL, *cf], indent=1, ensure_ascii=False) + "\n")
    reqs = [{"prompt": r["prompt"], "subject": r["subject"], "target": r["target_new"]} for r in [EIFFEL, *cf[:2]]]
    _jsonl(out / "edits.jsonl", reqs)
    (out / "heldout.txt").write_text(
        "The river runs past the old mill and under the stone bridge before it reaches the sea. In spring the "
        "meadows beside it fill with flowers, and in autumn the leaves of the tall trees turn yellow and red. "
        "Farmers bring their vegetables to the market in the square every Saturday morning, and children play "
        "by the fountain while their parents talk with neighbours about the weather and the harvest.\n")
    # the README's edit, made as `rankone edit` makes it (C from text sampled from the model), at
    # each corpus size given: the keep checks must hold whichever the default is
    req = EditRequest.create("{} is located in the city of", "The Eiffel Tower", "Rome")
    patches = [Editor(handle, {"sampled_corpus_tokens": n}, cache_dir=cache, progress=False).edit([req])
               for n in sizes]
    keep_prompts = ["The Louvre is located in the city of", "The Colosseum is located in the city of",
                    "The capital of Japan is", "The capital of Germany is", "The Statue of Liberty is located in the city of",
                    "The Brandenburg Gate is located in the city of", "Big Ben is located in the city of"]
    _jsonl(out / "checks.jsonl", [{"type": "target", "prompt": EIFFEL["prompt"], "target": "Rome"},
                                  *_keeps(model, tok, keep_prompts, 3, patches),
                                  {"type": "perplexity", "text_file": "heldout.txt"}])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["builtin", "smollm2"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[5_000, 10_000, 20_000],
                    help="sampled-corpus sizes whose Eiffel Tower edits SmolLM2's keep checks must all pass")
    ap.add_argument("--cache", default=None, help="where SmolLM2's sampled corpora and templates are (or go); "
                                                  "default: rankone's cache")
    args = ap.parse_args()
    for name, make in (("builtin", builtin), ("smollm2", lambda: smollm2(args.sizes, args.cache))):
        if args.only in (None, name):
            make()
            print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
