import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny import corpus_text, make_model, make_tokenizer  # noqa: E402

# Tiny models gain nothing from threads, and the machine may be shared: one thread is fastest.
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tok():
    return make_tokenizer(bos=False)


@pytest.fixture(scope="session")
def tok_bos():
    return make_tokenizer(bos=True)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(corpus_text())
    return p


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Key-statistics caches go to a per-session temp folder, never the user's home.
    monkeypatch.setenv("RANKONE_CACHE", str(tmp_path_factory.getbasetemp() / "rankone-cache"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tok):
    """A tiny GPT-2 saved as an ordinary Hugging Face folder, with a corpus.txt for key statistics."""
    d = tmp_path_factory.mktemp("m") / "tiny-gpt2"
    make_model("gpt2").save_pretrained(d)
    tok.save_pretrained(d)
    (d / "corpus.txt").write_text(corpus_text()[:50_000])
    return d


def run_cli(capsys, *argv):
    """`rankone ARGV...` in this process: (exit code, stdout, stderr)."""
    from rankone.cli.main import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def handle_of(model, tok):
    """The ModelHandle of a model built in the test (the architecture table or discovery finds its spec)."""
    from rankone.models.handle import ModelHandle

    return ModelHandle.of(model, tok)


def interrupt_and_resume(monkeypatch, run, again, at: int):
    """`run` stopped by Ctrl-C as its step from edit `at` begins, then `again()` (a new run on the
    same folder) resumed to the end: its records."""
    from rankone.eval.sequential import SequentialRun

    real = SequentialRun._step

    def crash(self, i0, i1):
        if i0 == at:
            raise KeyboardInterrupt
        return real(self, i0, i1)

    monkeypatch.setattr(SequentialRun, "_step", crash)
    with pytest.raises(KeyboardInterrupt):
        run.run()
    monkeypatch.setattr(SequentialRun, "_step", real)
    return again().run()
