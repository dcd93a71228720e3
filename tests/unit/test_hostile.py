"""Hostile input across every command: one line on stderr, no traceback, the documented exit code,
and not one file created or changed (the folders are hashed before and after each row). Plus a
mutation test: bytes and numbers flipped in a saved patch are refused or provably harmless."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load, save as st_save

from rankone.artifacts.merged import save_merged
from rankone.artifacts.patch import Patch, apply_patch, make_edit
from rankone.core.util import utcnow
from rankone.cli.main import main
from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.models.load import load_model
from rankone.lifecycle import dbfile
from rankone.testbed import builtin_model_dir
from hostile_inputs import ROUND_TWO, build_round_two
from tiny import make_model

M = builtin_model_dir()
MODULE = "transformer.h.0.mlp.c_proj"


def synth(model, module=MODULE, seed=0, subject="Stoukthen Fokai Thathai") -> Patch:
    w = arch.weight_oi(arch.get_module(model, module)).detach().clone()
    g = torch.Generator().manual_seed(seed)
    e, _ = make_edit(w, torch.randn(w.shape[0], 1, generator=g) * 1e-2, torch.randn(1, w.shape[1], generator=g),
                     module=module, layer=int(module.split(".")[-3]), method="r-rome", hparams={}, seed=seed,
                     request={"prompt": "{} was born in", "subject": subject, "target": "Lisbon"})
    return Patch([e], base={"model_type": model.config.model_type, "name_or_path": "", "n_layers": 4}, created_at=utcnow())


def rewrite_payload(src: Path, dst: Path, change) -> None:
    """Copy a patch folder, changing its tensors with `change(dict)` but keeping the header's metadata."""
    shutil.copytree(src, dst)
    data = (dst / "patch.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n])["__metadata__"]
    t = st_load(data)
    change(t)
    (dst / "patch.safetensors").write_bytes(st_save(t, metadata=meta))


def rewrite_manifest(src: Path, dst: Path, change) -> None:
    shutil.copytree(src, dst)
    man = json.loads((dst / "patch.json").read_text())
    change(man)
    (dst / "patch.json").write_text(json.dumps(man, indent=2))


@pytest.fixture(scope="module")
def w(tmp_path_factory, model_dir, tok_bos):
    """The work folder every row runs in, with good and bad inputs."""
    d = tmp_path_factory.mktemp("hostile")
    handle = load_model(M)
    model = handle.model
    p = synth(model)
    p.save(d / "p")
    rewrite_payload(d / "p", d / "tampered", lambda t: t["edits.0.B"].__setitem__((0, 0), t["edits.0.B"][0, 0] + 1.0))
    rewrite_manifest(d / "p", d / "tampered-man", lambda m: m["edits"][0]["request"].__setitem__("target", "Paris"))
    rewrite_manifest(d / "p", d / "schema99", lambda m: m.__setitem__("schema_version", 99))
    shutil.copytree(d / "p", d / "garbage")
    (d / "garbage" / "patch.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}xx")
    synth(make_model("gpt2"), "transformer.h.1.mlp.c_proj").save(d / "alien")  # another model's shapes
    h = apply_patch(model, Patch.load(d / "p"))
    save_merged(handle, [Patch.load(d / "p")], [str(d / "p")], h.originals, d / "applied")
    h.revert()
    trunc = d / "trunc"
    trunc.mkdir()
    for f in M.iterdir():
        if f.is_file():
            shutil.copy(f, trunc / f.name)
    (trunc / "model.safetensors").write_bytes((M / "model.safetensors").read_bytes()[:100_000])
    (d / "noconfig").mkdir()
    (d / "ro").mkdir()
    (d / "afile.txt").write_text("x")
    (d / "full").mkdir()
    (d / "full" / "keep.txt").write_text("x")
    (d / "bad.jsonl").write_text('{"prompt": "{} was born in", "subject": "X"\n')
    (d / "suite.jsonl").write_text('{"type": "target", "prompt": "X was born in"}\n')
    from rankone.lifecycle.registry import Registry

    with Registry(d / "reg.db") as reg:
        reg.add(d / "p", "alice", "ticket 1")
    build_round_two(d, model, model_dir, make_model("llama"), tok_bos, synth)
    lock = sqlite3.connect(d / "locked.db", isolation_level=None)  # another process's write, in progress
    lock.execute("BEGIN IMMEDIATE")
    os.chmod(d / "ro", 0o555)
    yield d
    os.chmod(d / "ro", 0o755)
    lock.close()


_HASHED: dict[tuple, str] = {}


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under the roots (names, kinds, bytes): a change anywhere changes it.
    A file is hashed again only when its inode, size or modification time changed (every write does)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            key = f"{root.name}/{p.relative_to(root)}"
            if p.is_dir() or not p.is_file():  # a FIFO is never read (it would block)
                out[key] = "dir" if p.is_dir() else "special"
                continue
            st = p.stat()
            memo = (str(p), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if memo not in _HASHED:
                _HASHED[memo] = hashlib.sha256(p.read_bytes()).hexdigest()
            out[key] = _HASHED[memo]
    return out


LONG = "{{}} was born in " + "and then " * 5000  # 10,000 words (braces doubled for str.format)
MD = ["--model", "{M}"]
# (id, argv with {M} (the built-in model) and {w} (the work folder), exit code, text in the message)
ROWS = [
    # ---- edit
    ("edit v_steps not a number", ["edit", *MD, "--prompt", "{{}} was born in", "--subject", "Stoukthen Fokai Thathai", "--target", "Lisbon",
                                   "--hparams", '{{"v_steps": "many"}}', "--out", "{w}/o"], 2, 'v_steps must be a whole number, not "many"'),
    ("edit v_lr a string", ["edit", *MD, "--prompt", "{{}} is", "--subject", "A", "--target", "B", "--hparams", '{{"v_lr": "fast"}}',
                            "--out", "{w}/o"], 2, "v_lr must be a number"),
    ("edit fast_value not a bool", ["edit", *MD, "--prompt", "{{}} is", "--subject", "A", "--target", "B", "--hparams",
                                    '{{"fast_value": 1}}', "--out", "{w}/o"], 2, "fast_value must be true or false"),
    ("edit prefix_spec malformed", ["edit", *MD, "--prompt", "{{}} is", "--subject", "A", "--target", "B", "--hparams",
                                    '{{"prefix_spec": [[0, 2]]}}', "--out", "{w}/o"], 2, "prefix_spec holds"),
    ("edit hparams unknown key", ["edit", *MD, "--prompt", "{{}} is", "--subject", "A", "--target", "B", "--hparams",
                                  '{{"v_stepz": 3}}', "--out", "{w}/o"], 2, "unknown hyper-parameter"),
    ("edit hparams not JSON", ["edit", *MD, "--prompt", "{{}} is", "--subject", "A", "--target", "B", "--hparams", "{{oops",
                               "--out", "{w}/o"], 2, "not valid JSON"),
    ("edit negative learning rate", ["edit", *MD, "--prompt", "{{}} is", "--subject", "A", "--target", "B", "--hparams",
                                     '{{"v_lr": -1}}', "--out", "{w}/o"], 2, "v_lr must be a positive finite number"),
    ("edit out under a read-only folder", ["edit", *MD, "--prompt", "{{}} was born in", "--subject", "Stoukthen Fokai Thathai",
                                           "--target", "Lisbon", "--out", "{w}/ro/sub/p"], 2, "read-only"),
    ("edit prompt longer than the context", ["edit", *MD, "--prompt", LONG, "--subject", "Stoukthen Fokai Thathai",
                                             "--target", "Lisbon", "--out", "{w}/o"], 2, "the model reads at most 128 positions"),
    ("edit subject not in prompt", ["edit", *MD, "--prompt", "The capital is", "--subject", "Paris", "--target", "Rome",
                                    "--out", "{w}/o"], 2, "contains neither"),
    ("edit empty target", ["edit", *MD, "--prompt", "{{}} is", "--subject", "A", "--target", " ", "--out", "{w}/o"], 2, "target is empty"),
    ("edit layer out of range", ["edit", *MD, "--prompt", "{{}} was born in", "--subject", "Stoukthen Fokai Thathai", "--target", "Lisbon",
                                 "--layer", "9", "--out", "{w}/o"], 2, "out of range"),
    ("edit layer not a number", ["edit", *MD, "--prompt", "{{}} is", "--subject", "A", "--target", "B", "--layer", "top",
                                 "--out", "{w}/o"], 2, "--layer takes a layer number"),
    ("edit unknown method", ["edit", *MD, "--prompt", "{{}} is", "--subject", "A", "--target", "B", "--method", "mend",
                             "--out", "{w}/o"], 2, "invalid choice"),
    ("edit without --out", ["edit", *MD, "--prompt", "{{}} is", "--subject", "A", "--target", "B"], 2, "required: --out"),
    ("edit out is a file", ["edit", *MD, "--prompt", "{{}} is", "--subject", "A", "--target", "B", "--out", "{w}/afile.txt"], 2,
     "exists and is a file"),
    ("edit out not empty", ["edit", *MD, "--prompt", "{{}} is", "--subject", "A", "--target", "B", "--out", "{w}/full"], 2,
     "already exists and is not empty"),
    ("edit requests file missing", ["edit", *MD, "--requests", "{w}/nope.jsonl", "--out", "{w}/o"], 2, "does not exist"),
    ("edit requests file bad JSON", ["edit", *MD, "--requests", "{w}/bad.jsonl", "--out", "{w}/o"], 2, "is not valid JSON"),
    ("edit model folder missing", ["edit", "--model", "{w}/nomodel", "--prompt", "{{}} is", "--subject", "A", "--target", "B",
                                   "--out", "{w}/o"], 2, "does not exist"),
    ("edit folder without config", ["edit", "--model", "{w}/noconfig", "--prompt", "{{}} is", "--subject", "A", "--target", "B",
                                    "--out", "{w}/o"], 2, "no config.json"),
    ("edit truncated model.safetensors", ["edit", "--model", "{w}/trunc", "--prompt", "{{}} is", "--subject", "A", "--target", "B",
                                          "--out", "{w}/o"], 2, "cannot load the model"),
    ("edit stats corpus missing", ["edit", *MD, "--prompt", "{{}} was born in", "--subject", "Stoukthen Fokai Thathai",
                                   "--target", "Lisbon", "--stats-corpus", "{w}/nocorpus.txt", "--out", "{w}/o"], 2, "does not exist"),
    ("edit missing its target (--require-success)",
     ["edit", *MD, "--prompt", "{{}} was born in", "--subject", "Stoukthen Fokai Thathai", "--target", "東京🎌", "--quiet",
      "--require-success", "--hparams", '{{"v_steps": 1, "stats_tokens": 5000, "prefix_spec": [[2, 1]]}}', "--out", "{w}/o"],
     1, "did not reach the target"),
    # ---- apply
    ("apply tampered payload", ["apply", *MD, "--patch", "{w}/tampered", "--out", "{w}/o"], 2, "tensor edits.0.B does not match its digest"),
    ("apply tampered manifest", ["apply", *MD, "--patch", "{w}/tampered-man", "--out", "{w}/o"], 2,
     "patch.json does not match the digest"),
    ("apply the same patch twice", ["apply", *MD, "--patch", "{w}/p", "--patch", "{w}/p", "--out", "{w}/o"], 2, "is patch 1 again"),
    ("apply onto a folder that carries it", ["apply", "--model", "{w}/applied", "--patch", "{w}/p", "--out", "{w}/o"], 2,
     "already carries patch"),
    ("apply another model's patch", ["apply", *MD, "--patch", "{w}/alien", "--out", "{w}/o"], 2, "this patch was made for a gpt2"),
    ("apply corrupt safetensors", ["apply", *MD, "--patch", "{w}/garbage", "--out", "{w}/o"], 2, "is corrupt"),
    ("apply newer schema", ["apply", *MD, "--patch", "{w}/schema99", "--out", "{w}/o"], 2, "schema version 99"),
    ("apply missing patch", ["apply", *MD, "--patch", "{w}/nope", "--out", "{w}/o"], 2, "is not a patch"),
    ("apply truncated model", ["apply", "--model", "{w}/trunc", "--patch", "{w}/p", "--out", "{w}/o"], 2, "cannot load the model"),
    ("apply out under read-only", ["apply", *MD, "--patch", "{w}/p", "--out", "{w}/ro/o"], 2, "read-only"),
    # ---- revert
    ("revert tampered patch", ["revert", "--model", "{w}/applied", "--patch", "{w}/tampered", "--out", "{w}/o"], 2, "does not match its digest"),
    ("revert a patch never applied", ["revert", *MD, "--patch", "{w}/p", "--out", "{w}/o"], 2, "cannot revert"),
    ("revert without a record", ["revert", *MD, "--out", "{w}/o"], 2, "has no rankone record"),
    ("revert the same patch twice", ["revert", "--model", "{w}/applied", "--patch", "{w}/p", "--patch", "{w}/p", "--out", "{w}/o"], 2,
     "is patch 1 again"),
    # ---- show
    ("show tampered payload", ["show", "{w}/tampered"], 2, "does not match its digest"),
    ("show tampered manifest", ["show", "{w}/tampered-man"], 2, "does not match the digest"),
    ("show missing", ["show", "{w}/nope"], 2, "is not a patch"),
    # ---- generate
    ("generate empty prompt", ["generate", *MD, "--prompt", ""], 2, "the prompt is empty"),
    ("generate negative max-new-tokens", ["generate", *MD, "--prompt", "Hi", "--max-new-tokens", "-5"], 2, "must be at least 1"),
    ("generate prompt longer than the context", ["generate", *MD, "--prompt", LONG.replace("{{}}", "Ana")], 2, "shorten it"),
    ("generate tampered patch", ["generate", *MD, "--prompt", "Hi", "--patch", "{w}/tampered"], 2, "does not match its digest"),
    ("generate the same patch twice", ["generate", *MD, "--prompt", "Hi", "--patch", "{w}/p", "--patch", "{w}/p"], 2, "again"),
    ("generate truncated model", ["generate", "--model", "{w}/trunc", "--prompt", "Hi"], 2, "cannot load the model"),
    # ---- eval and bench
    ("eval nothing to compare", ["eval", *MD, "--cases", "{M}", "--out", "{w}/e.json"], 2, "nothing to compare"),
    ("eval tampered patch", ["eval", *MD, "--cases", "{M}", "--patch", "{w}/tampered", "--out", "{w}/e.json"], 2, "does not match its digest"),
    ("eval --n 0", ["eval", *MD, "--cases", "{M}", "--patch", "{w}/p", "--n", "0"], 2, "--n must be at least 1"),
    ("eval out is a folder", ["eval", *MD, "--cases", "{M}", "--patch", "{w}/p", "--out", "{w}/full"], 2, "is a folder"),
    ("eval out under read-only", ["eval", *MD, "--cases", "{M}", "--patch", "{w}/p", "--out", "{w}/ro/e.json"], 2, "read-only"),
    ("eval cases missing", ["eval", *MD, "--cases", "{w}/nocases.json", "--patch", "{w}/p", "--out", "{w}/e.json"], 2, "does not exist"),
    ("bench --n 0", ["bench", "sequential", *MD, "--cases", "{M}", "--n", "0", "--out", "{w}/seq"], 2, "--n must be at least 1"),
    ("bench out is a file", ["bench", "sequential", *MD, "--cases", "{M}", "--n", "2", "--out", "{w}/afile.txt"], 2, "is a file"),
    # ---- trace
    ("trace neither fact nor cases", ["trace", *MD, "--out", "{w}/t"], 2, "trace needs --prompt and --subject"),
    ("trace out under read-only", ["trace", *MD, "--prompt", "{{}} was born in", "--subject", "Stoukthen Fokai Thathai",
                                   "--out", "{w}/ro/t"], 2, "read-only"),
    # ---- registry and export
    ("registry add tampered", ["registry", "add", "{w}/tampered", "--reason", "r", "--registry", "{w}/reg.db"], 2, "does not match its digest"),
    ("registry add without reason", ["registry", "add", "{w}/p", "--registry", "{w}/reg.db"], 2, "needs --reason"),
    ("registry add no patch", ["registry", "add", "{w}/nope", "--reason", "r", "--registry", "{w}/reg2.db"], 2, "is not a patch"),
    ("registry show unknown id", ["registry", "show", "ffff", "--registry", "{w}/reg.db"], 2, "no patch 'ffff'"),
    ("registry list bad state", ["registry", "list", "--state", "shipped", "--registry", "{w}/reg.db"], 2, "unknown state"),
    ("registry release unvalidated", ["registry", "release", "{w}/p", "--registry", "{w}/reg.db"], 2, "validate it first"),
    ("registry log without registry", ["registry", "log", "--registry", "{w}/none.db"], 2, "no registry at"),
    ("registry validate bad suite", ["registry", "validate", "{w}/p", *MD, "--suite", "{w}/suite.jsonl", "--registry", "{w}/reg.db"],
     2, "suite.jsonl:1"),
    ("registry rollback without reason", ["registry", "rollback", "{w}/p", "--registry", "{w}/reg.db"], 2, "needs --reason"),
    ("registry build out under read-only", ["registry", "build", *MD, "--out", "{w}/ro/b", "--registry", "{w}/reg.db"], 2, "read-only"),
    ("export tampered", ["export", *MD, "--patch", "{w}/tampered", "--format", "peft", "--out", "{w}/x"], 2, "does not match its digest"),
    ("export unknown format", ["export", *MD, "--patch", "{w}/p", "--format", "lora", "--out", "{w}/x"], 2, "invalid choice"),
    # ---- serve, staging, the vLLM export
    ("serve registry missing", ["serve", "--registry", "{w}/none.db"], 2, "no registry at"),
    ("serve admin token file missing", ["serve", "--admin-token-file", "{w}/nope"], 2, "cannot read --admin-token-file"),
    ("serve port out of range", ["serve", "--port", "70000"], 2, "--port must be from 0 to 65535"),
    ("serve batch of zero", ["serve", "--max-batch", "0"], 2, "--max-batch must be at least 1"),
    ("registry stage above 100 %", ["registry", "stage", "{w}/p", "--canary", "200", "--registry", "{w}/reg.db"], 2,
     "percentage of traffic"),
    ("registry stage unvalidated", ["registry", "stage", "{w}/p", "--canary", "5", "--registry", "{w}/reg.db"], 2,
     "validate it first"),
    ("registry abort not staged", ["registry", "abort", "{w}/p", "--reason", "r", "--registry", "{w}/reg.db"], 2,
     "only a staged patch can be aborted"),
    ("export vllm of a gpt2", ["export", *MD, "--patch", "{w}/p", "--format", "vllm", "--out", "{w}/x"], 2,
     "vLLM cannot serve GPT-2"),
    # ---- testbed, demo, the command line itself
    ("testbed check missing", ["testbed", "check", "{w}/nomodel"], 2, "testbed directory not found"),
    ("testbed build unknown arch", ["testbed", "build", "--arch", "bert", "--out", "{w}/tb"], 2, "unknown arch"),
    ("demo model missing", ["demo", "--model", "{w}/nomodel"], 2, "is not a testbed model"),
    ("unknown command", ["frobnicate"], 2, "invalid choice"),
]
FIRST_ROUND = len(ROWS)
ROWS += ROUND_TWO  # issue 29: see tests/hostile_inputs.py
PARAMS = [r if isinstance(r, type(pytest.param())) else pytest.param(*r[1:], id=r[0]) for r in ROWS]


@pytest.mark.parametrize("argv, code, message", PARAMS)
def test_bad_input_is_one_line_and_writes_nothing(w, model_dir, argv, code, message, capsys, caplog, monkeypatch):
    """Exit 2 (or 1): one line on stderr, no traceback, nothing written. Exit 0 (legal but suspicious
    input): a warning or note, no traceback, nothing written in the hashed folders."""
    monkeypatch.chdir(w)  # default outputs would land in the hashed folder
    monkeypatch.setenv("XDG_DATA_HOME", str(w / "xdg"))  # and the default registry too
    monkeypatch.delenv("RANKONE_REGISTRY", raising=False)
    monkeypatch.setattr(dbfile, "LOCK_WAIT_S", 0)  # a locked registry is refused at once, not after 2 minutes
    monkeypatch.setattr(dbfile, "QUICK_WAIT_MS", 100)
    x = w.parent / "hostile-scratch"
    fill = {"{M}": str(M), "{w}": str(w), "{x}": str(x)}
    args = [a.format(M=M, w=w, x=x) for a in argv]
    for k, v in fill.items():
        message = message.replace(k, v)
    before = snapshot(w, M, model_dir)
    try:
        got = main(args)
    except SystemExit as e:  # argparse
        got = e.code
    out = capsys.readouterr()
    err = out.err
    assert got == code, err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    if code == 0:
        assert message in err + out.out + caplog.text, err
    else:
        assert len(lines) == 1 and message in lines[0], err
        assert lines[0].startswith("rankone")
    assert snapshot(w, M, model_dir) == before


def test_the_table_covers_every_command_and_is_large_enough():
    from rankone.cli.main import build_parser
    import argparse

    commands = {(r.values[0] if isinstance(r, type(pytest.param())) else r[1])[0] for r in ROWS}
    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(top.choices) <= commands | {"bench"}
    assert FIRST_ROUND >= 73 and len(ROWS) - FIRST_ROUND >= 52  # issue 29: the second round adds the 52 it lists


# ---- mutations of a saved patch ---------------------------------------------------------------


def _saved_good_patch(model, where: Path, seed: int) -> tuple[Patch, torch.Tensor, dict[str, torch.Tensor]]:
    """A synthetic patch saved at `where`, the edited weight it gives, and the model's untouched state."""
    good = synth(model, seed=seed)
    good.save(where)
    h = apply_patch(model, good)
    want = arch.weight_oi(arch.get_module(model, MODULE)).detach().clone()
    h.revert()
    return good, want, {k: v.clone() for k, v in model.state_dict().items()}


def _mutants(p: Path) -> list[tuple[str, str, bytes]]:
    """(name, file, new bytes): flipped bytes in the safetensors header, its payload and the manifest,
    and changed numbers and fields in the manifest."""
    st, man_bytes = (p / "patch.safetensors").read_bytes(), (p / "patch.json").read_bytes()
    (n,) = struct.unpack("<Q", st[:8])
    out = []
    for name, data, lo, hi in [("header", st, 0, 8 + n), ("payload", st, 8 + n, len(st)), ("manifest", man_bytes, 0, len(man_bytes))]:
        f = "patch.json" if name == "manifest" else "patch.safetensors"
        for k in range(12):  # evenly spread positions, each byte flipped in one bit
            i = lo + (hi - lo - 1) * k // 11
            b = bytearray(data)
            b[i] ^= 1 << (k % 8)
            out.append((f"{name}-byte{i}", f, bytes(b)))
    man = json.loads(man_bytes)
    e = man["edits"][0]
    fields = {
        "delta_fro": lambda: e.__setitem__("delta_fro", e["delta_fro"] * 2),
        "sha256_after": lambda: e.__setitem__("sha256_after", "0" * 64),
        "sha256_before": lambda: e.__setitem__("sha256_before", "1" * 64),
        "module": lambda: e.__setitem__("module", "transformer.h.1.mlp.c_proj"),
        "weight_shape": lambda: e.__setitem__("weight_shape", [512, 128]),
        "rank": lambda: e.__setitem__("rank", 2),
        "B name": lambda: e.__setitem__("B", "edits.0.A"),
        "digest": lambda: man["payload_sha256"].__setitem__("edits.0.B", "2" * 64),
        "target": lambda: e["request"].__setitem__("target", "Paris"),
        "n_fix": lambda: e.__setitem__("n_fix", 0),
        "schema": lambda: man.__setitem__("schema_version", 1),
    }
    for name, change in fields.items():
        man = json.loads(man_bytes)
        e = man["edits"][0]
        change()
        out.append((f"field-{name}", "patch.json", json.dumps(man, indent=2).encode()))
    return out


def test_every_mutant_is_refused_or_harmless(tmp_path, capsys):
    model, tok = load_model(M)
    capsys.readouterr()  # the library's own loading bar
    good, want, base = _saved_good_patch(model, tmp_path / "good", seed=3)
    refused = harmless = 0
    for name, f, data in _mutants(tmp_path / "good"):
        d = tmp_path / name
        shutil.copytree(tmp_path / "good", d)
        (d / f).write_bytes(data)
        try:
            q = Patch.load(d)
            h = apply_patch(model, q)
        except RankoneError as e:
            assert "\n" not in str(e), name
            refused += 1
            assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items()), name  # untouched
            # the CLI says it in one line too
            assert main(["show", str(d)]) == 2
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
            continue
        # provably harmless: the same weights as the good patch (and a clean revert)
        assert torch.equal(arch.weight_oi(arch.get_module(model, MODULE)), want), name
        h.revert()
        harmless += 1
    assert refused >= 40 and refused + harmless == len(_mutants(tmp_path / "good"))


def resign(d: Path) -> None:
    """What a forger who knows the format does: recompute both digests after changing the files,
    writing them with the library's own patch writer."""
    from rankone.artifacts.patch_files import payload_digests, write_patch_files

    man = json.loads((d / "patch.json").read_text())
    t = st_load((d / "patch.safetensors").read_bytes())
    man["payload_sha256"] = payload_digests(t)
    write_patch_files(d, man, t, overwrite=True)


@pytest.mark.parametrize("change, refused", [
    (lambda m, t: t["edits.0.B"].__setitem__((3, 0), 0.5), "does not give the weights it records"),  # a forged number
    (lambda m, t: t.__setitem__("edits.0.A", t["edits.0.A"] * 2), "does not give the weights it records"),
    (lambda m, t: t.__setitem__("edits.0.fix.val", t["edits.0.fix.val"] + 1), None),  # revert's business, not apply's
    (lambda m, t: m["edits"][0].__setitem__("sha256_after", "0" * 64), "does not give the weights it records"),
    (lambda m, t: m["edits"][0].__setitem__("sha256_before", "1" * 64), "does not fit this model"),
    (lambda m, t: m["edits"][0].__setitem__("module", "transformer.h.1.mlp.c_proj"), "which is not layer 0.s edited projection"),
    (lambda m, t: m["edits"][0].__setitem__("weight_shape", [512, 128]), "do not fit weight_shape"),
    (lambda m, t: m["edits"][0].__setitem__("layer", "zero"), "malformed layer"),
    (lambda m, t: m["edits"][0].__setitem__("request", "Paris"), "malformed request"),
    (lambda m, t: t.__setitem__("edits.0.fix.idx", t["edits.0.fix.idx"] + 10**9), "points outside"),
    (lambda m, t: m["edits"][0].__setitem__("delta_fro", 1e9), None),  # descriptive only: same weights
])
def test_a_forged_patch_with_recomputed_digests_is_refused_by_apply_or_harmless(tmp_path, change, refused):
    model, _ = load_model(M)
    good, want, base = _saved_good_patch(model, tmp_path / "good", seed=4)
    d = tmp_path / "forged"
    shutil.copytree(tmp_path / "good", d)
    man = json.loads((d / "patch.json").read_text())
    t = st_load((d / "patch.safetensors").read_bytes())
    change(man, t)
    (d / "patch.json").write_text(json.dumps(man))
    (d / "patch.safetensors").write_bytes(st_save(t))
    resign(d)
    if refused is None:
        h = apply_patch(model, Patch.load(d))
        assert torch.equal(arch.weight_oi(arch.get_module(model, MODULE)), want)
        h.revert()
        return
    with pytest.raises(RankoneError, match=refused):
        apply_patch(model, Patch.load(d))
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_registry_check_finds_a_tampered_store_copy(tmp_path, capsys):
    from rankone.lifecycle.registry import Registry

    model, _ = load_model(M)
    synth(model, seed=5).save(tmp_path / "p")
    with Registry(tmp_path / "reg.db") as reg:
        rec, _ = reg.add(tmp_path / "p", "alice", "r")
        assert reg.check().ok
        store = reg.patch_dir(rec.id)
    rewrite_payload(tmp_path / "p", tmp_path / "t", lambda t: t["edits.0.A"].__setitem__((0, 3), 7.0))
    os.chmod(store / "patch.safetensors", 0o644)
    shutil.copy(tmp_path / "t" / "patch.safetensors", store / "patch.safetensors")
    assert main(["registry", "check", "--registry", str(tmp_path / "reg.db")]) == 1
    out = capsys.readouterr().out
    assert f"problem: patch {rec.id}" in out and "damaged" in out
    # and a build or export from it is refused before anything is written
    assert main(["export", "--model", str(M), "--patch", rec.id, "--registry", str(tmp_path / "reg.db"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "does not match its digest" in capsys.readouterr().err and not (tmp_path / "x").exists()
