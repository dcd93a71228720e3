"""Every method of the table on every statistics path a user can take: a corpus given with
--stats-corpus, the one the model card names, and (none at all) a corpus sampled from the model.
A method whose settings lack what a path needs cannot ship: this table fails."""

import json
import shutil

import pytest

from rankone.artifacts.patch import Patch
from rankone.methods.base import METHODS
from rankone.models.card import ModelCard
from conftest import run_cli

REQS = ('{"prompt": "{} was born in", "subject": "Danielle Darrieux", "target": "Rome"}\n'
        '{"prompt": "{} plays the", "subject": "Toko Yasuda", "target": "violin"}\n')
FAST = {"v_steps": 2, "stats_tokens": 3000, "sampled_corpus_tokens": 600, "prefix_spec": [[3, 2]], "layer": 1}
SOURCES = ("given", "card", "sampled")


@pytest.fixture(scope="module")
def folders(model_dir, tmp_path_factory):
    """The tiny model three ways: its corpus named by a model card, and with no corpus at all."""
    root = tmp_path_factory.mktemp("paths")
    carded, bare = root / "carded", root / "bare"
    for d in (carded, bare):
        shutil.copytree(model_dir, d)
        (d / "corpus.txt").unlink()
    (carded / "text").mkdir()
    shutil.copy(model_dir / "corpus.txt", carded / "text" / "notes.txt")
    ModelCard(stats_corpus="text/notes.txt").save(carded / "rankone.json")
    return {"given": bare, "card": carded, "sampled": bare, "corpus": model_dir / "corpus.txt"}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_on_every_statistics_path(name, source, folders, tmp_path, capsys):
    reqs = tmp_path / "r.jsonl"
    reqs.write_text(REQS)
    extra = ["--stats-corpus", folders["corpus"]] if source == "given" else []
    code, out, err = run_cli(capsys, "edit", "--quiet", "--model", folders[source], "--method", name, "--requests", reqs,
                             "--hparams", json.dumps(FAST), *extra, "--out", tmp_path / "p")
    assert code == 0, err
    p = Patch.load(tmp_path / "p")
    recorded = p.edits[-1].diagnostics["stats"]["corpus"]
    if source == "sampled":
        assert recorded.startswith("sampled from the model: 600 tokens"), recorded
    else:
        assert recorded.endswith("corpus.txt" if source == "given" else "notes.txt"), recorded
    assert all(e.method == name for e in p.edits)
