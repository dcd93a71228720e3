"""Key statistics: token counting, corpus formats, a verified on-disk cache, the factorisation."""

import json

import pytest
import torch

from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.core.hooks import capture
from rankone.methods.corpus import token_windows
from rankone.methods.stats import LayerStats, _file_for, collect_mom2, layer_stats
from tiny import make_model
from conftest import handle_of  # noqa: E402


def test_windows_count_tokens_not_documents(tok, tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": "To be or not to be, that is the question. " * 3}) for _ in range(40)))
    wins = list(token_windows(tok, p, window=32, n_tokens=500))
    assert sum(len(w) for w in wins) == 500
    assert all(len(w) <= 32 for w in wins)


def test_leading_bos_in_every_window(tok_bos, corpus):
    wins = list(token_windows(tok_bos, corpus, window=16, n_tokens=100))
    bos = tok_bos.convert_tokens_to_ids("<s>")
    assert all(w[0] == bos for w in wins)


def test_statistics_bar_counts_to_what_the_corpus_gives(tok, tmp_path, monkeypatch):
    from rankone.methods import stats as stats_mod

    bars = []

    class Bar:  # tqdm's interface, recording the total it was promised and what it was given
        def __init__(self, total=None, **kw):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(stats_mod, "tqdm", Bar)
    short = tmp_path / "short.txt"
    short.write_text("To be or not to be, that is the question.\n" * 40)
    _, count = collect_mom2(handle_of(make_model("gpt2"), tok), [1], short, n_tokens=1_000_000, window=64)
    assert count < 1_000_000 and bars[0].total == bars[0].n == count  # not a bar to 1,000,000 that stops short


def test_mom2_equals_direct_computation(tok, corpus):
    model = make_model("gpt2")
    mom2, count = collect_mom2(handle_of(model, tok), [0, 2], corpus, n_tokens=300, window=50, batch_tokens=150, progress=False)
    assert count == 300
    ids = torch.tensor([w for w in token_windows(tok, corpus, 50, 300)])  # 6 full windows of 50
    with capture(model, [handle_of(model, None).proj_path(2)], outputs=False) as rec:
        model(input_ids=ids)
    k = rec.inputs[handle_of(model, None).proj_path(2)].reshape(-1, 128).double()
    assert torch.allclose(mom2[2], k.T @ k / 300, rtol=1e-9, atol=1e-12)


def test_cache_is_reused_and_corruption_is_detected(tok, corpus, tmp_path, caplog):
    model = make_model("gpt2")
    a = layer_stats(handle_of(model, tok), [1], corpus, n_tokens=2000, cache_dir=tmp_path, progress=False)[1]
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    b = layer_stats(handle_of(model, tok), [1], corpus, n_tokens=2000, cache_dir=tmp_path, progress=False)[1]
    assert torch.equal(a.mom2, b.mom2)
    # flip bytes inside the tensor data: the checksum must catch it and the stats be recomputed
    raw = bytearray(files[0].read_bytes())
    raw[-50] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    c = layer_stats(handle_of(model, tok), [1], corpus, n_tokens=2000, cache_dir=tmp_path, progress=False)[1]
    assert "ignoring" in caplog.text
    assert torch.equal(a.mom2, c.mom2)
    # a truncated file is detected too
    files[0].write_bytes(files[0].read_bytes()[:100])
    d = layer_stats(handle_of(model, tok), [1], corpus, n_tokens=2000, cache_dir=tmp_path, progress=False)[1]
    assert torch.equal(a.mom2, d.mom2)


def test_cache_key_tracks_upstream_weights_only(tok, corpus, tmp_path):
    model = make_model("gpt2")
    key = lambda layer: layer_stats(handle_of(model, tok), [layer], corpus, 1000, tmp_path, progress=False)[layer].meta["model"]  # noqa: E731
    k1 = key(1)
    with torch.no_grad():  # the edited projection itself and later layers cannot change layer-1 keys
        model.transformer.h[1].mlp.c_proj.weight.add_(1.0)
        model.transformer.h[2].mlp.c_fc.weight.add_(1.0)
    assert key(1) == k1
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.weight.add_(1.0)
    assert key(1) != k1


def test_solve_is_float64_and_exact():
    a = torch.randn(200, 8, dtype=torch.float64)
    st = LayerStats(a.T @ a / 200, 200)
    k = torch.randn(8, dtype=torch.float32)
    x = st.solve(k)
    assert x.dtype == torch.float64
    assert torch.allclose(st.mom2 @ x, k.double(), atol=1e-10)


def test_corpus_errors(tok, tmp_path):
    model = make_model("gpt2")
    with pytest.raises(RankoneError, match="does not exist"):
        layer_stats(handle_of(model, tok), [0], tmp_path / "missing.txt", 100, tmp_path, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RankoneError, match="no .txt or .jsonl"):
        layer_stats(handle_of(model, tok), [0], tmp_path / "empty", 100, tmp_path, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(RankoneError, match="bad.jsonl:2"):
        layer_stats(handle_of(model, tok), [0], bad, 100, tmp_path, progress=False)
    assert not list(tmp_path.glob("*.safetensors"))


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma2"])
def test_truncated_pass_gives_the_full_pass_C_bit_for_bit(model_type, tok, tok_bos, corpus):
    model = make_model(model_type)
    t = tok_bos if model_type in ("llama", "gemma2") else tok
    last = handle_of(model, t).block(2)
    calls = []
    h = last.register_forward_hook(lambda *a: calls.append(1))
    try:
        cut, n_cut = collect_mom2(handle_of(model, t), [0, 1], corpus, n_tokens=700, window=64, batch_tokens=256, progress=False)
        assert calls == []  # layer 2 (and the LM head after it) never ran
        full, n_full = collect_mom2(handle_of(model, t), [0, 1], corpus, n_tokens=700, window=64, batch_tokens=256,
                                    progress=False, truncate=False)
        assert calls  # the full pass did run it
    finally:
        h.remove()
    assert n_cut == n_full >= 700  # (BOS-adding tokenizers count their BOS too)
    for layer in (0, 1):
        assert torch.equal(cut[layer], full[layer])


def test_factor_is_cached_beside_C(tok, corpus, tmp_path):

    model = make_model("gpt2")
    a = layer_stats(handle_of(model, tok), [1], corpus, n_tokens=2000, cache_dir=tmp_path, progress=False)[1]
    b = layer_stats(handle_of(model, tok), [1], corpus, n_tokens=2000, cache_dir=tmp_path, progress=False)[1]
    assert b._chol is not None  # read from disk, not factored again
    assert torch.equal(a.factor(), b._chol)
    k = torch.randn(a.mom2.shape[0], dtype=torch.float64)
    assert torch.allclose(b.mom2 @ b.solve(k), k, atol=1e-8)
