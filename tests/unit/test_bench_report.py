"""The commands and prose BENCHMARKS.md records name paths the same on every machine."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # headline.py imports _report by name
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def report():
    return _load("_report")


@pytest.fixture()
def home(tmp_path, monkeypatch):
    h = tmp_path / "home" / "user"
    h.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(h))
    return h


def test_paths_are_shown_relative_to_the_repository_the_folder_beside_it_or_home(report, home):
    root = report.ROOT
    assert report.shown(root / "runs" / "testbed-bench-gpt2") == "runs/testbed-bench-gpt2"
    assert report.shown(root) == "."
    assert report.shown(root.parent / "shared" / "data" / "counterfact" / "cf.json") == "../shared/data/counterfact/cf.json"
    assert report.shown(home / ".cache" / "rankone" / "models" / "smollm2-135m") == "~/.cache/rankone/models/smollm2-135m"
    assert report.shown("~/.cache/x") == "~/.cache/x"
    assert report.shown("/elsewhere/x.txt") == "/elsewhere/x.txt"  # under none of them: as it is


def test_the_deepest_folder_wins_and_home_wins_a_tie_with_the_folder_beside_the_repository(report, tmp_path):
    home = tmp_path / "u"
    root = home / "src" / "rankone"  # a repository inside home
    assert report.shown(root / "docs" / "a.png", root=root, home=home) == "docs/a.png"
    assert report.shown(home / "src" / "shared" / "d.json", root=root, home=home) == "../shared/d.json"
    assert report.shown(home / ".cache" / "m", root=root, home=home) == "~/.cache/m"
    root2 = home / "rankone"  # the folder beside the repository is home itself
    assert report.shown(home / "shared" / "d.json", root=root2, home=home) == "~/shared/d.json"
    assert report.shown("/x/y", root=Path("/rankone"), home=home) == "/x/y"  # no folder beside one at the top


def test_command_writes_no_absolute_folder_and_drops_redraw_options(report, home, monkeypatch):
    root = report.ROOT
    monkeypatch.chdir(root)
    argv = [str(root / "benchmarks" / "sequential.py"),
            "--model", str(home / ".cache" / "rankone" / "models" / "smollm2-135m"),
            f"--cases={root.parent}/shared/data/counterfact/counterfact-edit.json",
            "--out", str(root / "runs" / "x y"),
            "--extra", f"--ppl-text {root.parent}/shared/data/text/t.txt",
            "--report-only", "--note", "a sentence", "--n", "100", "--title", "SmolLM2's 100 edits"]
    line = report.command(argv=argv)
    assert line == ("python benchmarks/sequential.py --model ~/.cache/rankone/models/smollm2-135m "
                    "--cases ../shared/data/counterfact/counterfact-edit.json --out 'runs/x y' "
                    "--extra '--ppl-text ../shared/data/text/t.txt' --n 100 --title 'SmolLM2'\"'\"'s 100 edits'")
    assert str(root.parent) not in line and str(home) not in line


def test_a_relative_path_given_from_another_folder_is_shown_from_the_repository(report, home, monkeypatch):
    root = report.ROOT
    monkeypatch.chdir(root / "benchmarks")
    line = report.command(argv=["sequential.py", "--model", "../src/rankone/testbed/builtin", "--method", "r-rome"])
    assert line == "python benchmarks/sequential.py --model src/rankone/testbed/builtin --method r-rome"


def test_prose_paths_are_rewritten_but_nothing_else(report, home):
    root = report.ROOT
    text = (f"cases `{root.parent}/shared/data/cf.json`, from `{home}/.cache/rankone/trace/aie.json`.\n"
            f"runs in {root}/runs/x; see https://example.org{root.parent}/shared and {root.parent}x/other "
            "(0.970 / 0.880, ‖Δ‖ 14.9)")
    assert report.relative_paths(text) == (
        "cases `../shared/data/cf.json`, from `~/.cache/rankone/trace/aie.json`.\n"
        f"runs in runs/x; see https://example.org{root.parent}/shared and {root.parent}x/other "
        "(0.970 / 0.880, ‖Δ‖ 14.9)")


# ---- the headline at the top of BENCHMARKS.md ---------------------------------------------------


@pytest.fixture(scope="module")
def headline(report):
    return _load("headline")


def test_anchors_follow_githubs_rules(headline):
    slug = headline.github_slug
    assert slug("heading with a - dash") == "heading-with-a---dash"
    assert slug("exchange.bind_headers(exchange, routing [, bindCallback])") == "exchangebind_headersexchange-routing--bindcallback"
    assert slug("I ♥ unicode") == "i--unicode" and slug("en–dash") == "endash"
    assert slug("Привет non-latin 你好") == "привет-non-latin-你好"
    assert slug("alphaedit@ε0.05 — SmolLM2's ≤ 5 % ‖Δ‖_F") == "alphaeditε005--smollm2s--5--δ_f"
    doc = "# echo\n## echo\n```\n## not a heading\n```\n## echo 1\n## echo-1\n### echo\n## Testbed (`rankone build`)\n"
    assert [s for _, _, s in headline.anchors(doc)] == ["echo", "echo-1", "echo-1-1", "echo-1-2", "echo-2",
                                                        "testbed-rankone-build"]


def _section(name, title, body):
    return f"<!-- {name}:begin -->\n## {title}\n\nCommand: `python x`  \nMachine: m\n\n{body}\n<!-- {name}:end -->\n\n"


SINGLE = """Model `smollm2-135m` (30 layers), edit layer 3.

| protocol | method | n | ES | PS | NS | S | GS |
|---|---|---|---|---|---|---|---|
| known | unedited | 20 | 0.000 | 0.125 | 0.844 | 0.000 | 0.005 |
| known | r-rome | 20 | 0.970 | 0.880 | 0.822 | 0.886 | 0.915 |
| all | r-rome | 10 | 0.111 | 0.222 | 0.333 | 0.444 | 0.555 |
"""
TESTBED = """Model `tiny-gpt2`; cases `x`.

| method | ES | PS | NS | S |
|---|---|---|---|---|
| rome | 0.990 | 0.980 | 0.956 | 0.975 |
"""


def _sequential(n, methods, ps=True):
    head = "| | " + " | ".join(f"{m} (layers 0–3, batches of 10)" if m == "memit" else f"{m} (layer 3)" for m in methods) + " |"
    rows = [head, "|---|" + "---|" * len(methods),
            "| edits attempted / written / refused | " + " | ".join(f"{n} / {n} / 0" for _ in methods) + " |",
            "| retention ES / kept / top-1 at the end | " + " | ".join(f"0.{n}1 / 0.9 / 0.5" for _ in methods) + " |",
            "| NS start → end | " + " | ".join(f"0.821 → 0.{n}2" for _ in methods) + " |"]
    if ps:
        rows.append("| PS of earlier edits at the end | " + " | ".join(f"0.{n}3" for _ in methods) + " |")
    return "Model `smollm2-135m`, cases `y`;\n\n" + "\n".join(rows) + "\n"


def _doc(report):
    return (report.HEADER + "\n"
            + _section("real_counterfact_smollm2", "CounterFact on a real model: smollm2-135m", SINGLE)
            + _section("null_space", "AlphaEdit's null space", "| a | b |\n|---|---|\n| 1 | 2 |")
            + _section("eval_single_tiny", "Single edits — tiny world (GPT-2 4x8)", TESTBED)
            + _section("sequential_big", "Sequential editing, memit vs r-rome — SmolLM2-135M, 300 edits",
                       _sequential(300, ["memit", "r-rome"], ps=False))
            + _section("sequential_small", "Sequential editing, r-rome — SmolLM2-135M, 100 edits", _sequential(100, ["r-rome"])))


def _rows(block):
    return {tuple(c.strip() for c in line.strip("|").split("|"))[1]: [c.strip() for c in line.strip("|").split("|")]
            for line in block.splitlines() if line.startswith("|") and not line.startswith(("| model", "|---"))}


def test_the_headline_reads_every_figure_from_the_sections_and_links_it(report, headline):
    doc = _doc(report)
    out = headline.with_headline(doc)
    assert out.startswith(report.HEADER + "\n<!-- headline:begin -->\n## Headline figures\n")
    assert out.index("<!-- headline:end -->") < out.index("<!-- real_counterfact_smollm2:begin -->")
    assert headline.without_headline(out) == doc  # the sections themselves are untouched
    block = out[:out.index("<!-- headline:end -->")]
    rows = _rows(block)
    # single edits: the protocol "known" row, not "all"; sequential: the run with the most edits
    assert rows["r-rome"][2:11] == ["[0.970][real_counterfact_smollm2]", "[0.880][real_counterfact_smollm2]",
                                    "[0.822][real_counterfact_smollm2]", "[0.915][real_counterfact_smollm2]",
                                    "[300][sequential_big]", "[0.3001][sequential_big]", "–",
                                    "[0.821 → 0.3002][sequential_big]", "–"]
    assert rows["memit"][2:6] == ["–"] * 4 and rows["memit"][6] == "[300][sequential_big]"
    assert rows["unedited"][0] == "SmolLM2-135M" and rows["r-rome"][0] == ""  # the baseline first
    testbed = [line for line in block.splitlines() if "`tiny-gpt2` (testbed)" in line]
    assert len(testbed) == 1 and "[0.990][eval_single_tiny]" in testbed[0] and testbed[0].count("–") == 6
    # every reference resolves to the anchor GitHub gives that section's heading
    heads = {text: slug for _, text, slug in headline.anchors(out)}
    targets = dict(re.findall(r"^\[([^\]]+)\]: #(\S+)$", block, re.M))
    assert targets["null_space"] == heads["AlphaEdit's null space"] == "alphaedits-null-space"
    assert targets["eval_single_tiny"] == "single-edits--tiny-world-gpt-2-4x8"
    assert set(re.findall(r"\]\[([^\]]+)\]", block)) == set(targets)
    assert "- [AlphaEdit's null space][null_space]" in block  # the contents list every section
    assert headline.with_headline(out) == out  # re-running changes nothing


def test_re_running_after_a_benchmark_refreshes_the_headline(report, headline, tmp_path, monkeypatch):
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text(headline.with_headline(_doc(report)))
    monkeypatch.setattr(report, "BENCH", bench)
    report.write_section("real_counterfact_smollm2", "CounterFact on a real model: smollm2-135m",
                         SINGLE.replace("0.970", "0.555"))
    report.write_section("sequential_new", "Sequential editing, r-rome-2key — SmolLM2-135M, 50 edits",
                         _sequential(50, ["r-rome-2key"]))
    text = bench.read_text()
    assert text.index("<!-- headline:end -->") < text.index("<!-- real_counterfact_smollm2:begin -->")
    out = headline.with_headline(text)
    rows = _rows(out[:out.index("<!-- headline:end -->")])
    assert rows["r-rome"][2] == "[0.555][real_counterfact_smollm2]"
    assert rows["r-rome-2key"][6:9] == ["[50][sequential_new]", "[0.501][sequential_new]", "[0.503][sequential_new]"]
    assert "[sequential_new]: #sequential-editing-r-rome-2key--smollm2-135m-50-edits" in out
