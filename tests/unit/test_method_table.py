"""A new editing method is one module plus one line in the method table: the CLI, the Editor and
the patch pick it up with nothing else changed."""

import json
import textwrap

import pytest
import torch

from rankone.artifacts.patch import Patch
from rankone.methods import base
from rankone.models.load import load_model
from conftest import run_cli

TOY = textwrap.dedent('''
    """A toy batch method: at each request's averaged key k̄ the projection adds `scale` · 1."""
    import functools
    from dataclasses import dataclass

    import torch

    from rankone.core.architectures import in_out_features
    from rankone.methods.base import Computed, LayerUpdate, Method
    from rankone.methods.rome import compute_key
    from rankone.methods.settings import MethodSettings


    @dataclass(frozen=True)
    class ToySettings(MethodSettings):
        method: str = "toy"
        scale: float = 0.5


    def compute(ctx, requests, s):
        keys = torch.stack([compute_key(ctx.handle, r, s.layer, ctx.templates(s)).k_mean for r in requests], 1)  # [in, n]
        C = ctx.stats([s.layer], s.stats_tokens)[s.layer]
        d_out = in_out_features(ctx.handle.proj(s.layer))[1]
        B = torch.full((d_out, len(requests)), s.scale, dtype=torch.float64)
        A = torch.linalg.solve(keys.T @ C.solve(keys), C.solve(keys).T)  # [n, in]: A K = I
        return Computed([LayerUpdate(ctx.handle.proj_path(s.layer), s.layer, B, A, {"toy": True}, keys)])


    TOY = Method(name="toy", settings=ToySettings, compute=compute, one_at_a_time=False,
                 summary="a toy batch method (tests only)")
''')


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_method_for_tests.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(base.METHODS, "toy", "toy_method_for_tests:TOY")  # the table entry: the only change


def test_a_method_added_through_the_table_alone_runs_through_rankone_edit(toy, model_dir, tmp_path, capsys):
    reqs = tmp_path / "r.jsonl"
    reqs.write_text('{"prompt": "{} was born in", "subject": "Danielle Darrieux", "target": "Rome"}\n'
                    '{"prompt": "{} plays the", "subject": "Toko Yasuda", "target": "violin"}\n')
    code, out, err = run_cli(capsys, "edit", "--quiet", "--model", model_dir, "--method", "toy", "--requests", reqs,
                             "--layer", "1", "--hparams", '{"scale": 0.25, "stats_tokens": 5000, "prefix_spec": [[3, 2]]}',
                             "--out", tmp_path / "p")
    assert code == 0, err
    assert "toy: 2 request(s) as one batch" in out
    p = Patch.load(tmp_path / "p")
    (e,) = p.edits
    assert e.method == "toy" and e.rank == 2 and e.hparams["scale"] == 0.25 and e.diagnostics["toy"]
    assert len(e.diagnostics["outcomes"]) == 2  # measured like any method's
    # what the method promised: ΔW k̄_i = 0.25 · 1 at each request's key
    dW = e.B.double() @ e.A.double()
    assert torch.allclose(dW @ e.keys, torch.full((e.B.shape[0], 2), 0.25, dtype=torch.float64), atol=1e-5)
    # its settings are checked like any method's: a typo is one line, exit 2, nothing written
    code, _, err = run_cli(capsys, "edit", "--quiet", "--model", model_dir, "--method", "toy", "--requests", reqs,
                           "--hparams", '{"scael": 1}', "--out", tmp_path / "q")
    assert code == 2 and "unknown hyper-parameter(s) ['scael']" in err and not (tmp_path / "q").exists()


def test_the_table_drives_help_and_choices(toy, capsys):
    with pytest.raises(SystemExit):
        run_cli(capsys, "edit", "--help")
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert "toy: a toy batch method (tests only)" in out and "scale (number, default 0.5)" in out


def test_every_table_entry_is_a_method_with_settings_that_resolve(model_dir):
    h = load_model(model_dir)
    for name in base.METHODS:
        m = base.method(name)
        s = base.resolve_settings(h, {"method": name})
        assert isinstance(s, m.settings) and s.method == name and s.layer is not None
        assert 0 <= min(s.layers) and max(s.layers) < h.n_layers
        assert m.summary and json.loads(s.to_json())["method"] == name
