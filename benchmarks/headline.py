"""The top of BENCHMARKS.md: a headline table (method × model), a table of contents and a legend.

    python benchmarks/headline.py

Run it after any benchmark: every figure in the headline is read from the tables of the sections
below it (never typed here) and links to the section it came from; a figure no section has is
shown as "–". It rewrites only its own block (`<!-- headline:begin -->` … `<!-- headline:end -->`),
between the file's header and the first section, so the other scripts keep writing theirs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import BENCH, HEADER  # noqa: E402

NAME = "headline"
# Which sections feed the headline: single edits measured on the cases the unedited model knows,
# and sequential runs. The other sections (speed, layers, settings, corpora) are in the contents.
SINGLE = ("real_counterfact_", "eval_single_")
SEQUENTIAL = ("sequential_",)
REAL_MODELS = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma 3 270M"}  # rankone.models.zoo's, in its order
MISSING = "–"


# ---- GitHub's heading anchors ---------------------------------------------------------------

_KEEP = ("L", "M", "Nd", "Nl", "Pc")  # letters, marks, digits, letter numbers, connectors such as _


def github_slug(text: str) -> str:
    """The anchor GitHub gives a heading: lower case, every character but letters, digits, marks,
    `_`, `-` and spaces dropped (punctuation, symbols, dashes other than `-`), each space a `-`."""
    kept = "".join(c for c in text.lower() if c in " -" or c.isalpha() or unicodedata.category(c).startswith(_KEEP))
    return kept.replace(" ", "-")


def heading_text(md: str) -> str:
    """The text of a heading as rendered: code spans, emphasis and links reduced to their words."""
    md = re.sub(r"`([^`]*)`", r"\1", md)
    md = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", md)
    md = re.sub(r"(\*{1,2})([^*]+)\1", r"\2", md)
    return md.strip()


def anchors(doc: str) -> list[tuple[int, str, str]]:
    """(level, text, anchor) of every heading in document order; a repeated anchor gets -1, -2, …
    as on GitHub. Lines inside fenced code are not headings."""
    seen: dict[str, int] = {}
    out, fenced = [], False
    for line in doc.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        m = None if fenced else re.match(r"^(#{1,6})\s+(.*?)(?:\s+#+)?\s*$", line)
        if not m:
            continue
        text = heading_text(m.group(2))
        base = slug = github_slug(text)
        while slug in seen:
            seen[base] += 1
            slug = f"{base}-{seen[base]}"
        seen[slug] = 0
        out.append((len(m.group(1)), text, slug))
    return out


# ---- the sections and their tables ----------------------------------------------------------


@dataclass
class Section:
    name: str
    title: str
    body: str
    anchor: str = ""

    @property
    def model(self) -> str | None:
        """The model the section measured, as its text names it (`Model `NAME``)."""
        m = re.search(r"^Model `([^`]+)`", self.body, re.M)
        return m.group(1) if m else None


def sections(doc: str) -> list[Section]:
    """Every section a benchmark wrote, in file order (the headline's own block left out)."""
    pat = re.compile(r"<!-- ([^\s:]+):begin -->\n## ([^\n]*)\n(.*?)<!-- \1:end -->", re.S)
    return [Section(m.group(1), m.group(2), m.group(3)) for m in pat.finditer(doc) if m.group(1) != NAME]


def tables(body: str) -> list[tuple[list[str], list[list[str]]]]:
    """The Markdown tables in a text: (header cells, rows of cells); rows whose cell count differs
    from the header's are left out."""
    out, block = [], []
    for line in body.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2 and all(set(c) <= set("-: ") for c in block[1]):
            out.append((block[0], [r for r in block[2:] if len(r) == len(block[0])]))
        block = []
    return out


@dataclass
class Figures:
    section: Section
    values: dict[str, str]
    weight: int  # which section wins where several measured the same method on the same model


def single_edit(secs: list[Section]) -> dict[tuple[str, str], Figures]:
    """(model, method) -> ES/PS/NS/GS of single edits, from the rows of the `SINGLE` sections'
    method tables (protocol *known* where a table has protocols); the most cases win."""
    out: dict[tuple[str, str], Figures] = {}
    for s in secs:
        if not s.name.startswith(SINGLE) or s.model is None:
            continue
        for head, rows in tables(s.body):
            if not {"method", "ES", "PS", "NS"} <= set(head):
                continue
            col = {h: i for i, h in enumerate(head)}
            for r in rows:
                if "protocol" in col and r[col["protocol"]] != "known":
                    continue
                n = int(r[col["n"]]) if "n" in col and r[col["n"]].isdigit() else 0
                key = (s.model, r[col["method"]])
                if key not in out or n > out[key].weight:
                    out[key] = Figures(s, {k: r[col[k]] if k in col else MISSING for k in ("ES", "PS", "NS", "GS")}, n)
    return out


_ROWS = {"edits": "edits attempted / written / refused", "efficacy": "retention ES / kept / top-1 at the end",
         "paraphrase": "PS of earlier edits at the end", "NS": "NS start → end", "perplexity": "perplexity start → end"}


def sequential(secs: list[Section]) -> dict[tuple[str, str], Figures]:
    """(model, method) -> the sequential figures after the last edit, from the `SEQUENTIAL`
    sections' summary tables (one column per method); the run with the most edits wins."""
    out: dict[tuple[str, str], Figures] = {}
    for s in secs:
        if not s.name.startswith(SEQUENTIAL) or s.model is None:
            continue
        for head, rows in tables(s.body):
            by_label = {r[0]: r for r in rows}
            if head[0] or _ROWS["edits"] not in by_label:
                continue
            for j, cell in enumerate(head[1:], 1):
                method = re.sub(r" \(layers? [^)]*\)$", "", cell)
                row = {k: by_label[label][j] if label in by_label else MISSING for k, label in _ROWS.items()}
                n = int(row["edits"].split("/")[0])
                row["edits"], row["efficacy"] = str(n), row["efficacy"].split(" / ")[0]
                key = (s.model, method)
                if key not in out or n > out[key].weight:
                    out[key] = Figures(s, row, n)
    return out


# ---- the block ------------------------------------------------------------------------------


def model_label(model: str) -> str:
    return REAL_MODELS.get(model) or f"`{model}` (testbed)"


def _cell(f: Figures | None, key: str) -> str:
    v = f.values.get(key, MISSING) if f is not None else MISSING
    return v if v == MISSING else f"[{v}][{f.section.name}]"  # a reference link: see `block`


def headline_table(secs: list[Section]) -> str:
    single, seq = single_edit(secs), sequential(secs)
    keys = list(dict.fromkeys([*single, *seq]))  # file order: single-edit rows first, then sequential-only methods
    models = [m for m in REAL_MODELS if any(k[0] == m for k in keys)]
    models += [m for m in dict.fromkeys(k[0] for k in keys) if m not in models]
    lines = ["| model | method | ES | PS | NS | GS | sequential edits | efficacy | paraphrase | NS start → end | "
             "perplexity start → end |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        methods = [k[1] for k in keys if k[0] == m]
        methods.sort(key=lambda x: x != "unedited")  # the unedited model first: the baseline
        for i, meth in enumerate(methods):
            a, b = single.get((m, meth)), seq.get((m, meth))
            cells = [model_label(m) if i == 0 else "", meth, *(_cell(a, k) for k in ("ES", "PS", "NS", "GS")),
                     *(_cell(b, k) for k in ("edits", "efficacy", "paraphrase", "NS", "perplexity"))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LEGEND = """\
- **ES** (efficacy): share of edits after which the model gives the new target a higher probability than the true answer on the edit prompt, p(new) > p(true); p is the target's per-token mean probability (the geometric mean over its tokens, teacher-forced), as in ROME's CounterFact code.
- **PS** (paraphrase): the same on the case's paraphrases of the prompt (averaged over a case's paraphrases, then over cases).
- **NS** (neighbourhood, locality): share of neighbour prompts (other subjects with the same relation) on which the model still prefers their own true answer to the edit's new target, p(true) > p(new); below 1 even unedited on CounterFact.
- **S**: harmonic mean of ES, PS and NS (0 when any is 0).
- **EM / PM / NM**: magnitudes: mean p(new) − p(true) on the prompt / on the paraphrases, mean p(true) − p(new) on neighbour prompts.
- **top-1**: greedy decoding (argmax at every target position) reproduces the whole target.
- **GS / GPS** (generation-based success): the greedy continuation of the prompt / of a paraphrase (20 tokens, not cut to the target's length) states the new target as whole words, ignoring case; GNS: a neighbour's continuation still states its own answer.
- **OS**: the edited subject's facts of other relations keep their true answer over the new target; in brackets the cases that have any.
- **degenerate**: share of cases where a greedy continuation holds a special token or one token four times in a row.
- **fluency**: ROME's generation entropy: (2/3 · H(bigrams) + 4/3 · H(trigrams)) / 2, in bits, of the words of continuations sampled from the top 5 tokens (seeded); it falls when text turns repetitive.
- **‖Δ‖_F**: Frobenius norm of the weight update one edit (or one batch) writes; **‖W − W₀‖_F**: distance of the edited weights from the unedited ones after all edits so far, over every edited layer.
- **retention** (sequential): ES, PS and top-1 of earlier edits re-measured on the model as it stands, over an evenly spaced sample of them; "kept": among those whose ES was 1 when made. The headline's *efficacy* and *paraphrase* are retention ES and PS after the last edit.
- **never-edited top-1** (sequential): share of a fixed sample of facts the unedited model answers (top-1) and that are never edited which it still answers; 1 at the start by construction.
- **perplexity**: exp(mean next-token negative log-likelihood) of held-out text, in windows of at most 256 tokens.
- **denominators**: r-ROME divides its rank-one update by k̄ᵀC⁻¹k̄ (the prefix-averaged key k̄ against itself), original ROME by k_oᵀC⁻¹k̄ (the bare prompt's key k_o against k̄); a ratio ROME/r-ROME near 0 means a huge update that can disable the model. The key cosine is that of k̄ and k_o.
- **–**: not measured (or not recorded) in that section."""


TOP = ("## Headline figures", "## Contents", "## Legend")  # the block's headings


def without_headline(doc: str) -> str:
    return re.sub(rf"<!-- {NAME}:begin -->.*?<!-- {NAME}:end -->\n*", "", doc, flags=re.S)


def _insert(doc: str, text: str) -> str:
    """`text` put before the first section (after the header), or at the end where there is none."""
    first = re.search(r"^<!-- [^\s:]+:begin -->", doc, re.M)
    if first is None:
        return doc.rstrip() + "\n\n" + text + "\n"
    return doc[:first.start()] + text + "\n\n" + doc[first.start():]


def block(doc: str) -> str:
    """The headline block for a document without one."""
    secs = sections(doc)
    # The anchors as GitHub will number them in the written file: the block adds only its TOP headings.
    heads = anchors(_insert(doc, "\n\n".join(TOP)))
    legend = next(slug for level, text, slug in heads if text == TOP[2][3:])
    it = iter((text, slug) for level, text, slug in heads if level == 2)
    for s in secs:  # each section's heading, in order (skipping any other level-2 heading)
        s.anchor = next(slug for text, slug in it if text == heading_text(s.title))
    contents = "\n".join(f"- [{s.title}][{s.name}]" for s in secs)
    # Reference links (`[figure][NAME]`) keep the table's source readable; NAME is the section's own.
    targets = "\n".join(f"[{s.name}]: #{s.anchor}" for s in secs)
    return f"""<!-- {NAME}:begin -->
{TOP[0]}

Written by `python benchmarks/headline.py` from the sections below (re-run it after any benchmark);
each figure links to the section that measured it, where its command, machine and protocol are.
Single edit: each case edited alone on the unedited model, measured, reverted; the cases the unedited
model knows, from the section with the most of them. Sequential: edits one after another, never
reverted; the run with the most edits for that method and model, measured after its last edit. The
two halves of a row can come from different sections (layer and settings as each says). Metrics:
[Legend](#{legend}).

{headline_table(secs)}

{TOP[1]}

{contents}

{TOP[2]}

{LEGEND}

{targets}
<!-- {NAME}:end -->"""


def with_headline(doc: str) -> str:
    """The document with its headline block written (or rewritten) before the first section."""
    doc = without_headline(doc)
    return _insert(doc, block(doc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true", help="print the block; leave BENCHMARKS.md as it is")
    args = ap.parse_args()
    doc = BENCH.read_text() if BENCH.exists() else HEADER
    if args.no_write:
        print(block(without_headline(doc)))
        return
    tmp = BENCH.with_suffix(".tmp")
    tmp.write_text(with_headline(doc))
    os.replace(tmp, BENCH)


if __name__ == "__main__":
    main()
