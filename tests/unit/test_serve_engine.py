"""The serving engine without HTTP: exact stable weights, per-row deltas, continuous batching
with mixed arms equal to offline generation, streaming text pieces, sticky routing."""

from __future__ import annotations

import threading

import pytest
import torch

from rankone.artifacts.patch import apply_patch
from rankone.core import architectures as arch
from rankone.core.fingerprint import tensor_sha256
from rankone.models.load import load_model
from rankone.serve.deltas import row_deltas
from rankone.serve.engine import Engine, GenRequest
from rankone.serve.patchsets import Arms, Staged, StableBuilder, swap_in
from rankone.serve.routing import Route, Router, canary_bucket
from rankone.serve.settings import ServeSettings
from rankone.serve.text import TextTracker
from rankone.testbed import builtin_llama_dir, builtin_model_dir
from serve_tools import offline, subject_patch

PROMPTS = ["Stoukthen Fokai Thathai was born in", "Nousren Thurber Likdos is a professional player of",
           "The company that employs Nasher Likdos Thoutem is", "Hello", "Thathai Nousren Likdos was born in"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def handle(request):
    return load_model(str(builtin_model_dir() if request.param == "gpt2" else builtin_llama_dir()))


@pytest.fixture(scope="module")
def patches(handle):
    m, tok = handle
    return [subject_patch(m, tok, "{} was born in", "Stoukthen Fokai Thathai", "Lisbon", scale=50, seed=1),
            subject_patch(m, tok, "{} is a professional player of", "Nousren Thurber Likdos", "chess", scale=50, seed=2),
            subject_patch(m, tok, "{} was born in", "Thathai Nousren Likdos", "Tokyo", scale=80, seed=3)]


def test_patches_change_their_subjects_answers(handle, patches):
    m, tok = handle
    for p, prompt in zip(patches, [PROMPTS[0], PROMPTS[1], PROMPTS[4]]):
        assert offline(m, tok, [p], prompt, 8) != offline(m, tok, [], prompt, 8)


def test_stable_builder_gives_applys_bits_and_restores_the_base(handle, patches):
    m, _ = handle
    before = {e.module: tensor_sha256(arch.weight_oi(arch.get_module(m, e.module))) for p in patches for e in p.edits}
    b = StableBuilder(m)
    weights = b.build(patches[:2], [patches[2]])
    applied = apply_patch(m, patches[:2])
    try:
        for mod, w in weights.items():
            assert tensor_sha256(w) == tensor_sha256(arch.weight_oi(arch.get_module(m, mod)))
    finally:
        applied.revert()
    assert {k: tensor_sha256(arch.weight_oi(arch.get_module(m, k))) for k in before} == before  # built off the model
    swap_in(m, b.build(patches[:1]))  # a chain, then a shorter one (a rollback): the base comes back exactly
    swap_in(m, b.build([]))
    assert {k: tensor_sha256(arch.weight_oi(arch.get_module(m, k))) for k in before} == before


def test_row_deltas_add_each_rows_patches_and_leave_no_hook(handle, patches):
    m, tok = handle
    arms = Arms("fp", (), tuple(Staged(f"p{i}", 0, 0, p) for i, p in enumerate(patches[:2])), torch.float32, "cpu")
    sets = [arms.stable, arms.with_deltas(["p0"], "candidate"), arms.with_deltas(["p0", "p1"], "candidate")]
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]] * 3)
    with torch.no_grad(), row_deltas(m, sets):
        got = m(input_ids=ids).logits
    assert all(not mod._forward_hooks for mod in m.modules())
    for i, ps in enumerate([[], patches[:1], patches[:2]]):
        applied = apply_patch(m, ps) if ps else None
        with torch.no_grad():
            want = m(input_ids=ids[:1]).logits[0]
        if applied:
            applied.revert()
        assert torch.allclose(got[i], want, atol=1e-4), i


def _run(engine: Engine, reqs: list[GenRequest]) -> list[dict]:
    done = [threading.Event() for _ in reqs]
    out: list[dict] = [{} for _ in reqs]
    for i, r in enumerate(reqs):
        def sink(ev, i=i):
            if ev[0] == "start":
                out[i]["patchset"] = ev[1]
            elif ev[0] == "done":
                out[i].update(ev[1])
                done[i].set()
            elif ev[0] == "error":
                out[i]["error"] = ev[1]
                done[i].set()
        r.sink = sink
        engine.submit(r)
    for d in done:
        assert d.wait(60)
    return out


def test_a_mixed_batch_equals_offline_generation_per_patch_set(handle, patches, tmp_path):
    m, tok = handle
    for i, p in enumerate(patches):
        p.save(tmp_path / f"p{i}")
    ids = [p.content_id()[:16] for p in patches]
    b = StableBuilder(m)
    swap_in(m, b.build([patches[0]]))  # patch 0 released (merged), 1 and 2 staged (deltas)
    try:
        arms = Arms("fp", ((ids[0], patches[0]),), (Staged(ids[1], 100, 0, patches[1]), Staged(ids[2], 100, 0, patches[2])),
                    torch.float32, "cpu", known={i: "x" for i in ids})
        engine = Engine(m, tok, arms, Router(tmp_path), max_batch=16)
        engine.start()
        try:
            pins = ["stable", "base", "candidate", None]
            reqs = [GenRequest(tok(p)["input_ids"], p, 3 + (j % 7), sink=None, route=Route("u", pin))  # type: ignore[arg-type]
                    for j, (p, pin) in enumerate((p, pin) for p in PROMPTS for pin in pins)]
            results = _run(engine, reqs)
        finally:
            engine.stop()
    finally:
        swap_in(m, b.build([]))
    chains = {"stable": [patches[0]], "base": [], "candidate": patches}
    for r, res in zip(reqs, results):
        ps = res["patchset"]
        assert ps.arm == (r.route.pin or "candidate")
        assert res["text"] == offline(m, tok, chains[ps.arm], r.prompt_text, r.max_tokens), (ps.arm, r.prompt_text)


def test_requests_join_a_running_batch(handle):
    """Continuous batching: a request that arrives mid-generation is answered before the long one ends."""
    m, tok = handle
    arms = Arms("fp", (), (), torch.float32, "cpu")
    engine = Engine(m, tok, arms, Router(None), max_batch=4)
    order: list[str] = []
    done = threading.Event()
    started = threading.Event()

    def sink(name):
        def f(ev):
            if ev[0] == "text" and name == "long":
                started.set()
            if ev[0] == "done":
                order.append(name)
                if len(order) == 2:
                    done.set()
        return f
    engine.start()
    try:
        engine.submit(GenRequest(tok(PROMPTS[3])["input_ids"], PROMPTS[3], 100, sink("long"), stop=["\x00"]))
        assert started.wait(30)
        engine.submit(GenRequest(tok(PROMPTS[0])["input_ids"], PROMPTS[0], 2, sink("short")))
        assert done.wait(60)
    finally:
        engine.stop()
    assert order == ["short", "long"]


def test_shadow_runs_wait_while_a_request_is_in_flight(handle, patches):
    """A shadow re-run uses idle time only: a request sent when the first one is answered finishes
    before the first one's shadow comparison is made."""
    m, tok = handle
    arms = Arms("fp", (), (Staged("s", 0, 100, patches[0]),), torch.float32, "cpu")
    order: list[str] = []
    done = threading.Event()
    engine = Engine(m, tok, arms, Router(None), on_shadow=lambda job, agree: (order.append("shadow"), done.set()))

    def sink(name, then=None):
        def f(ev):
            if ev[0] == "done":
                order.append(name)
                if then is not None:
                    engine.submit(then)
        return f
    second = GenRequest(tok(PROMPTS[1])["input_ids"], PROMPTS[1], 20, sink("second"), route=Route("u2"))
    engine.start()
    try:
        engine.submit(GenRequest(tok(PROMPTS[0])["input_ids"], PROMPTS[0], 5, sink("first", second), route=Route("u1")))
        assert done.wait(60)
    finally:
        engine.stop()
    assert order[:3] == ["first", "second", "shadow"]


def test_queue_is_bounded(handle):
    from rankone.serve.errors import ApiError

    m, tok = handle
    engine = Engine(m, tok, Arms("fp", (), (), torch.float32, "cpu"), Router(None), max_batch=1, max_waiting=2)
    for _ in range(3):  # not started: nothing is taken from the queue; the batch's place counts too
        engine.submit(GenRequest([1, 2], "x", 1, lambda ev: None))
    with pytest.raises(ApiError) as e:
        engine.submit(GenRequest([1, 2], "x", 1, lambda ev: None))
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "1"}


class _Tok:
    """Decodes ids as characters (chr), to test the text rules exactly."""
    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("text, stop, want, finish", [
    ("hello world", ["wor"], "hello ", "stop"),
    ("hello world", [], "hello worl", "length"),
    ("abcabc", ["ca"], "ab", "stop"),
    ("ab\x00cd", [], "ab", "stop"),  # end of sequence
])
def test_text_pieces_add_up_and_stop_where_they_should(text, stop, want, finish):
    t = TextTracker(_Tok(), 10, stop)
    pieces = [t.push(ord(c)) for c in text if t.finish is None]
    assert "".join(pieces) == t.text == want and t.finish == finish
    if stop:  # nothing that could still become a stop string was ever sent
        assert all(stop[0] not in "".join(pieces[:k + 1]) for k in range(len(pieces)))


def test_a_split_character_is_held_back():
    class Bytes(_Tok):
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")
    t = TextTracker(Bytes(), 10, [])
    pieces = [t.push(b) for b in "é!".encode()]
    assert pieces == ["", "é", "!"]


def test_canary_is_sticky_and_raising_it_only_adds_users():
    users = [f"user-{i}" for i in range(400)]
    at = {pct: {u for u in users if canary_bucket("abcd1234", u) < pct} for pct in (5, 25, 50, 100)}
    assert at[5] <= at[25] <= at[50] <= at[100] == set(users)
    assert 0.15 < len(at[25]) / len(users) < 0.35
    arms = Arms("fp", (), (), torch.float32, "cpu")
    assert Router(None).resolve(Route("user-1"), arms).arm == "stable"


def test_settings_round_trip_and_refuse_bad_values():
    from rankone.core.errors import RankoneError

    s = ServeSettings(port=1234, max_batch=4)
    assert ServeSettings.from_dict(s.to_dict()) == s
    with pytest.raises(RankoneError, match="max_batch"):
        ServeSettings(max_batch=0)
    with pytest.raises(RankoneError, match="unknown serve setting"):
        ServeSettings.from_dict({"max_batc": 3})
