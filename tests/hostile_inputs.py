"""The second round of hostile inputs (issue 29) for the table in tests/unit/test_hostile.py: the
files each row needs (`build_round_two`) and the rows themselves (`ROUND_TWO`).

A row is (id, argv, exit code, text in the message). Placeholders: {M} the built-in model, {w} the
work folder (hashed before and after every row: nothing in it may change), {t} the tiny GPT-2
folder of tests/conftest.py (also hashed), {x} a scratch folder outside both, for the rows whose
input is legal but suspicious: they exit 0 with a warning and may write there.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load, save as st_save

from rankone.artifacts.patch import Patch, make_edit
from rankone.core import architectures as arch
from rankone.core.util import utcnow
from rankone.lifecycle.registry import Registry

DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError in Python's json at about 1,000
NOT_UTF8 = b"\xff\xfe"
SURROGATE = "\udcff"  # how Python hands over an argv byte that is not UTF-8


def _model_copy(src: Path, dst: Path, config: dict | None = None, card: str | bytes | None = None) -> Path:
    shutil.copytree(src, dst)
    if config:
        c = json.loads((dst / "config.json").read_text())
        c.update(config)
        (dst / "config.json").write_text(json.dumps(c))
    if card is not None:
        (dst / "rankone.json").write_bytes(card.encode() if isinstance(card, str) else card)
    return dst


def _lm_head_patch(model: torch.nn.Module) -> Patch:
    """A patch whose manifest calls it a layer-0 r-ROME edit but whose module is the LM head, with
    every fingerprint and digest consistent (what a forger who knows the format makes)."""
    w = arch.weight_oi(model.get_submodule("lm_head")).detach().clone()
    g = torch.Generator().manual_seed(9)
    e, _ = make_edit(w, torch.randn(w.shape[0], 1, generator=g) * 1e-2, torch.randn(1, w.shape[1], generator=g),
                     module="lm_head", layer=0, method="r-rome", hparams={}, seed=0,
                     request={"prompt": "{} was born in", "subject": "Stoukthen Fokai Thathai", "target": "Lisbon"})
    return Patch([e], base={"model_type": "gpt2", "name_or_path": "", "n_layers": 4}, created_at=utcnow())


def _schema_one(src: Path, dst: Path) -> None:
    """The patch at src in the old schema 1: rank one as u and v, no digests."""
    shutil.copytree(src, dst)
    man = json.loads((dst / "patch.json").read_text())
    t = st_load((dst / "patch.safetensors").read_bytes())
    man["schema_version"] = 1
    man.pop("payload_sha256")
    for i, e in enumerate(man["edits"]):
        t[f"edits.{i}.u"], t[f"edits.{i}.v"] = t.pop(e.pop("B")).reshape(-1), t.pop(e.pop("A")).reshape(-1)
        e.update(u=f"edits.{i}.u", v=f"edits.{i}.v")
    (dst / "patch.json").write_text(json.dumps(man, indent=2))
    (dst / "patch.safetensors").write_bytes(st_save(t))


def build_round_two(d: Path, model: torch.nn.Module, tiny: Path, llama: torch.nn.Module, tok_bos, synth) -> None:
    """Every file the ROUND_TWO rows read, in the work folder d (the first round's files are there).
    `synth(model, module)` makes a synthetic patch of one module."""
    (d / "bad-utf8.json").write_bytes(b'{"v_steps": 3, "kl_prompt": "' + NOT_UTF8 + b' {} is a"}')
    (d / "deep.json").write_text(DEEP)
    (d / "deep.jsonl").write_text('{"prompt": ' + DEEP + "}\n")
    ok = {"prompt": "{} was born in", "subject": "Stoukthen Fokai Thathai", "target": "Lisbon"}
    lines = {
        "r-utf8.jsonl": b'{"prompt": "{} was born in", "subject": "Stoukthen Fokai Thathai' + NOT_UTF8 + b'", "target": "Lisbon"}\n',
        "r-typo.jsonl": json.dumps(dict(ok, subjekt="Stoukthen")).encode() + b"\n",
        "r-number.jsonl": json.dumps(dict(ok, target=42)).encode() + b"\n",
        "r-nan.jsonl": b'{"prompt": "{} was born in", "subject": "Stoukthen Fokai Thathai", "target": NaN}\n',
        "r-10000.jsonl": (json.dumps(ok) + "\n").encode() * 10_000,
        "r-two-targets.jsonl": (json.dumps(ok) + "\n" + json.dumps(dict(ok, target="Paris")) + "\n").encode(),
        "r-array.jsonl": b'["{} was born in", "Stoukthen Fokai Thathai", "Lisbon"]\n',
    }
    for name, data in lines.items():
        (d / name).write_bytes(data)
    (d / "tiny-corpus.txt").write_text("one two three four")
    (d / "binary-corpus.txt").write_bytes(bytes(range(256)) * 64)
    (d / "corpus-utf8.jsonl").write_bytes(b'{"text": "ordinary ' + NOT_UTF8 + b' text"}\n')
    (d / "corpus-deep.jsonl").write_text('{"text": ' + DEEP + "}\n")
    (d / "arch-utf8.json").write_bytes(b'{"layers": "transformer.h' + NOT_UTF8 + b'"}')
    (d / "cases-utf8.jsonl").write_bytes(b'{"prompt": "{} was born in", "subject": "Thathai' + NOT_UTF8 + b'", "answer": "Oslo"}\n')
    (d / "cases.jsonl").write_text(json.dumps({"prompt": "{} was born in", "subject": "Thathai", "answer": "Oslo"}) + "\n")
    # suites and policies
    target = '{"type": "target", "prompt": "Stoukthen Fokai Thathai was born in", "target": "Lisbon"}\n'
    (d / "suite-ok.jsonl").write_text(target)
    (d / "suite-utf8.jsonl").write_bytes(target.encode() + b'{"type": "keep", "prompt": "X' + NOT_UTF8 + b'"}\n')
    (d / "suite-deep.jsonl").write_text(target + '{"type": "keep", "prompt": ' + DEEP + "}\n")
    (d / "suite-up.jsonl").write_text(target + '{"type": "perplexity", "text_file": "../../../../etc/passwd"}\n')
    (d / "suite-abs.jsonl").write_text(target + '{"type": "perplexity", "text_file": "/etc/passwd"}\n')
    (d / "policy-deep.json").write_text('{"_about": ' + DEEP + "}")
    (d / "policy-utf8.json").write_bytes(b'{"_about": "' + NOT_UTF8 + b'"}')
    # heal's probes and policies
    (d / "probes-ok.jsonl").write_text('{"prompt": "Stoukthen Fokai Thathai was born in", "expected": "Lisbon"}\n')
    (d / "probes-bad.jsonl").write_text("not json\n")
    (d / "probes-typo.jsonl").write_text('{"prompt": "X is", "expekted": "Y"}\n')
    (d / "probes-deep.jsonl").write_text('{"prompt": ' + DEEP + "}\n")
    (d / "heal-words.json").write_text('{"k_users": "three"}')
    (d / "heal-array.json").write_text("[1, 2]")
    (d / "heal-steps.json").write_text('{"canary_steps": [50, 25]}')
    (d / "admin.token").write_text("s3cret")
    # patches
    _lm_head_patch(model).save(d / "lmhead")
    from rankone.models.load import load_model

    tiny_handle = load_model(tiny)
    ptm = synth(tiny_handle.model, "transformer.h.0.mlp.c_proj")
    ptm.base = tiny_handle.base_info()  # with the config it was made on
    ptm.save(d / "ptm")
    synth(llama, "model.layers.0.mlp.down_proj").save(d / "lp")
    _schema_one(d / "p", d / "schema1")
    shutil.copytree(d / "p", d / "deep-patch")
    (d / "deep-patch" / "patch.json").write_text(DEEP)
    shutil.copytree(d / "p", d / "utf8-patch")
    (d / "utf8-patch" / "patch.json").write_bytes((d / "p" / "patch.json").read_bytes().replace(b"Lisbon", b"Lis" + NOT_UTF8))
    # models: the tiny GPT-2 (3 layers, 32 wide) with a changed config or a hostile model card
    _model_copy(tiny, d / "tm")
    _model_copy(tiny, d / "nest" / "tm")
    (d / "nest" / "req.jsonl").write_text(json.dumps(ok) + "\n")
    _model_copy(tiny, d / "fewer-layers", {"n_layer": 2})
    _model_copy(tiny, d / "other-activation", {"activation_function": "relu"})
    _model_copy(tiny, d / "other-width", {"n_embd": 16})
    _model_copy(tiny, d / "card-shadow", card='{"stats_corpus": "../../../../../../etc/shadow"}')
    _model_copy(tiny, d / "card-abs", card='{"cases": "/etc/passwd"}')
    _model_copy(tiny, d / "card-deep", card=DEEP)
    _model_copy(tiny, d / "card-utf8", card=b'{"notes": "' + NOT_UTF8 + b'"}')
    _model_copy(tiny, d / "deep-record")
    (d / "deep-record" / "rankone").mkdir()
    (d / "deep-record" / "rankone" / "applied.json").write_text(DEEP)
    _model_copy(tiny, d / "bad-record")
    (d / "bad-record" / "rankone").mkdir()
    (d / "bad-record" / "rankone" / "applied.json").write_text('{"patches": [{"id": "x", "edits": 5}]}')
    _model_copy(tiny, d / "config-deep")
    (d / "config-deep" / "config.json").write_text(DEEP)
    sqlite3.connect(d / "foreign.db").executescript("CREATE TABLE patches (x); CREATE TABLE audit (y);")
    long_prompt = "Stoukthen Fokai Thathai " + "and then " * 300 + "was born in"
    (d / "suite-long.jsonl").write_text(json.dumps({"type": "keep", "prompt": long_prompt}) + "\n")
    (d / "cases-long.jsonl").write_text(json.dumps({"prompt": "{} " + "and then " * 300 + "was born in",
                                                    "subject": "Thathai", "answer": "Oslo"}) + "\n")
    if hasattr(os, "mkfifo"):
        os.mkfifo(d / "corpus.fifo")  # reading it would block forever
    llama.save_pretrained(d / "llama")
    tok_bos.save_pretrained(d / "llama")
    # registries: one whose patch is validated (for release), one inside a folder (for build), one locked
    with Registry(d / "reg3.db") as reg:
        rec, _ = reg.add(d / "p", "alice", "ticket 3")
        reg.record_validation(rec.id, {"results": []}, True, "alice")
    (d / "rg").mkdir()
    with Registry(d / "rg" / "reg.db") as reg:
        reg.add(d / "p", "alice", "ticket 4")
    Registry(d / "locked.db").close()


S = ["--prompt", "{{}} was born in", "--subject", "Stoukthen Fokai Thathai", "--target", "Lisbon"]
MD = ["--model", "{M}"]
E = ["edit", *MD, *S, "--out", "{w}/o"]  # a good edit: each row spoils one thing
QUICK = '{{"v_steps": 1, "v_steps_max": 1, "stats_tokens": 5000}}'
try:
    _cuda = torch.cuda.is_available()
except Exception:  # noqa: BLE001
    _cuda = False
NEEDS_CPU_TORCH = pytest.mark.skipif(_cuda, reason="this torch has CUDA: --device cuda is legal here")
NEEDS_FIFO = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")

ROUND_TWO = [
    # ---- text that is not text: bytes that are not UTF-8, wherever text comes in
    ("edit --prompt not UTF-8", ["edit", *MD, "--prompt", "{{}} was born in " + SURROGATE, "--subject", "A", "--target", "B",
                                 "--out", "{w}/o"], 2, "--prompt holds bytes that are not UTF-8"),
    ("edit --subject not UTF-8", ["edit", *MD, "--prompt", "{{}} is", "--subject", "A" + SURROGATE, "--target", "B",
                                  "--out", "{w}/o"], 2, "--subject holds bytes that are not UTF-8"),
    ("edit --target not UTF-8", ["edit", *MD, "--prompt", "{{}} is", "--subject", "A", "--target", "B" + SURROGATE,
                                 "--out", "{w}/o"], 2, "--target holds bytes that are not UTF-8"),
    ("edit --reason not UTF-8", [*E, "--reason", "ticket " + SURROGATE], 2, "--reason holds bytes that are not UTF-8"),
    ("edit --hparams file not UTF-8", [*E, "--hparams", "{w}/bad-utf8.json"], 2, "bad-utf8.json is not UTF-8 text (byte 0xff"),
    ("edit --hparams inline not UTF-8", [*E, "--hparams", '{{"kl_prompt": "{{}} ' + SURROGATE + '"}}'], 2,
     "--hparams holds bytes that are not UTF-8"),
    ("edit requests file not UTF-8", ["edit", *MD, "--requests", "{w}/r-utf8.jsonl", "--out", "{w}/o"], 2,
     "r-utf8.jsonl is not UTF-8 text (byte 0xff on line 1)"),
    ("edit --arch-spec file not UTF-8", [*E, "--arch-spec", "{w}/arch-utf8.json"], 2, "arch-utf8.json is not UTF-8 text"),
    ("edit .jsonl statistics corpus not UTF-8", [*E, "--stats-corpus", "{w}/corpus-utf8.jsonl", "--hparams", QUICK, "--quiet"], 2,
     "corpus-utf8.jsonl:1 is not UTF-8 text"),
    ("generate --prompt not UTF-8", ["generate", *MD, "--prompt", "Hi " + SURROGATE], 2, "--prompt holds bytes that are not UTF-8"),
    ("generate model card not UTF-8", ["generate", "--model", "{w}/card-utf8", "--prompt", "Hi"], 2, "rankone.json is not UTF-8"),
    ("show patch.json not UTF-8", ["show", "{w}/utf8-patch"], 2, "patch.json is not UTF-8 text"),
    ("trace --prompt not UTF-8", ["trace", *MD, "--prompt", "{{}} " + SURROGATE, "--subject", "A", "--out", "{w}/t"], 2,
     "--prompt holds bytes that are not UTF-8"),
    ("trace case file not UTF-8", ["trace", *MD, "--cases", "{w}/cases-utf8.jsonl", "--out", "{w}/t"], 2,
     "cases-utf8.jsonl is not UTF-8 text"),
    ("eval case file not UTF-8", ["eval", *MD, "--cases", "{w}/cases-utf8.jsonl", "--patch", "{w}/p", "--out", "{w}/e.json"], 2,
     "cases-utf8.jsonl is not UTF-8 text"),
    ("registry add --reason not UTF-8", ["registry", "add", "{w}/p", "--reason", "r" + SURROGATE, "--registry", "{w}/new.db"], 2,
     "--reason holds bytes that are not UTF-8"),
    ("registry validate suite not UTF-8", ["registry", "validate", "{w}/p", *MD, "--suite", "{w}/suite-utf8.jsonl",
                                           "--registry", "{w}/reg.db"], 2, "suite-utf8.jsonl is not UTF-8 text (byte 0xff on line 2)"),
    ("registry validate policy not UTF-8", ["registry", "validate", "{w}/p", *MD, "--suite", "{w}/suite-ok.jsonl", "--policy",
                                            "{w}/policy-utf8.json", "--registry", "{w}/reg.db"], 2, "policy-utf8.json is not UTF-8"),
    # ---- JSON nested 100,000 deep, in every JSON input
    ("edit --hparams inline nested 100,000 deep", [*E, "--hparams", DEEP], 2, "--hparams nests arrays or objects more than 100 deep"),
    ("edit --hparams file nested 100,000 deep", [*E, "--hparams", "{w}/deep.json"], 2, "nests arrays or objects more than 100 deep"),
    ("edit requests line nested 100,000 deep", ["edit", *MD, "--requests", "{w}/deep.jsonl", "--out", "{w}/o"], 2,
     "deep.jsonl:1 nests arrays or objects more than 100 deep"),
    ("edit --arch-spec nested 100,000 deep", [*E, "--arch-spec", "{w}/deep.json"], 2, "nests arrays or objects more than 100 deep"),
    ("edit .jsonl statistics corpus nested deep", [*E, "--stats-corpus", "{w}/corpus-deep.jsonl", "--hparams", QUICK, "--quiet"], 2,
     "corpus-deep.jsonl:1 nests arrays or objects"),
    ("show patch.json nested 100,000 deep", ["show", "{w}/deep-patch"], 2, "patch.json nests arrays or objects more than 100 deep"),
    ("apply patch.json nested 100,000 deep", ["apply", *MD, "--patch", "{w}/deep-patch", "--out", "{w}/o"], 2, "nests arrays"),
    ("generate model card nested 100,000 deep", ["generate", "--model", "{w}/card-deep", "--prompt", "Hi"], 2,
     "rankone.json nests arrays or objects more than 100 deep"),
    ("revert a record nested 100,000 deep", ["revert", "--model", "{w}/deep-record", "--out", "{w}/o"], 2,
     "applied.json nests arrays or objects more than 100 deep"),
    ("trace case file nested 100,000 deep", ["trace", *MD, "--cases", "{w}/deep.json", "--out", "{w}/t"], 2,
     "deep.json nests arrays or objects more than 100 deep"),
    ("registry validate suite nested deep", ["registry", "validate", "{w}/p", *MD, "--suite", "{w}/suite-deep.jsonl",
                                             "--registry", "{w}/reg.db"], 2, "suite-deep.jsonl:2 nests arrays or objects"),
    ("registry validate policy nested deep", ["registry", "validate", "{w}/p", *MD, "--suite", "{w}/suite-ok.jsonl", "--policy",
                                              "{w}/deep.json", "--registry", "{w}/reg.db"], 2, "nests arrays or objects more than 100"),
    ("registry release policy nested deep", ["registry", "release", "{w}/p", "--policy", "{w}/policy-deep.json",
                                             "--registry", "{w}/reg3.db"], 2, "policy-deep.json nests arrays or objects"),
    # ---- settings: numbers out of range or not finite, refused before any work
    ("edit --hparams integer beyond 2^63", [*E, "--hparams", '{{"seed": 99999999999999999999}}'], 2, "seed 99999999999999999999 is out of range"),
    ("edit --seed beyond 2^63", [*E, "--seed", str(1 << 64)], 2, "is out of range"),
    ("edit --hparams a 5,000-digit number", [*E, "--hparams", '{{"v_steps": ' + "9" * 5000 + "}}"], 2, "--hparams cannot be read"),
    ("edit v_steps of a trillion", [*E, "--hparams", '{{"v_steps": 1000000000000}}'], 2, "is more than 100,000 optimisation steps"),
    ("edit v_lr Infinity", [*E, "--hparams", '{{"v_lr": Infinity}}'], 2, "v_lr must be a finite number, not inf"),
    ("edit kl_factor NaN", [*E, "--hparams", '{{"kl_factor": NaN}}'], 2, "kl_factor must be a finite number, not nan"),
    ("edit v_weight_decay -5", [*E, "--hparams", '{{"v_weight_decay": -5}}'], 2, "v_weight_decay must be 0 or more"),
    ("edit a negative seed", [*E, "--hparams", '{{"seed": -3}}'], 2, "seed must be 0 or more"),
    ("edit memit clamp_norm_factor -Infinity", [*E, "--method", "memit", "--hparams", '{{"clamp_norm_factor": -Infinity}}'], 2,
     "clamp_norm_factor must be a finite number"),
    ("edit alphaedit l2 NaN", [*E, "--method", "alphaedit", "--hparams", '{{"l2": NaN}}'], 2, "l2 must be a finite number"),
    # ---- devices and architecture specs
    pytest.param([*E, "--device", "cuda"], 2, "--device cuda: this torch is built without CUDA",
                 id="edit --device cuda on CPU torch", marks=NEEDS_CPU_TORCH),
    ("edit --device banana", [*E, "--device", "banana"], 2, "unknown device 'banana'"),
    ("generate --device cuda:7", ["generate", *MD, "--prompt", "Hi", "--device", "cuda:7"], 2, "--device cuda:7"),
    ("edit --arch-spec whose projection is lm_head",
     [*E, "--arch-spec", '{{"layers": "transformer.h", "mlp": "transformer.h.{{}}.mlp", "proj": "lm_head", '
                         '"attn": "transformer.h.{{}}.attn", "embed": "transformer.wte"}}'], 2, "proj 'lm_head' must be a path inside each block"),
    ("edit --arch-spec with a null path",
     [*E, "--arch-spec", '{{"layers": null, "mlp": "m", "proj": "p", "attn": "a", "embed": "e"}}'], 2,
     "every module path must be a non-empty string"),
    # ---- requests that say something else than they seem to
    ("edit requests with a typo key", ["edit", *MD, "--requests", "{w}/r-typo.jsonl", "--out", "{w}/o"], 2,
     "r-typo.jsonl:1: edit request has unknown field(s) ['subjekt']"),
    ("edit requests target 42", ["edit", *MD, "--requests", "{w}/r-number.jsonl", "--out", "{w}/o"], 2, "must be a string, not 42"),
    ("edit requests target NaN", ["edit", *MD, "--requests", "{w}/r-nan.jsonl", "--out", "{w}/o"], 2, "must be a string, not NaN"),
    ("edit 10,000 identical requests", ["edit", *MD, "--requests", "{w}/r-10000.jsonl", "--out", "{w}/o"], 2,
     "r-10000.jsonl:2 repeats"),
    ("edit requests with two targets for one fact", ["edit", *MD, "--requests", "{w}/r-two-targets.jsonl", "--out", "{w}/o"], 2,
     "gives another target ('Paris', not 'Lisbon')"),
    ("edit requests line that is an array", ["edit", *MD, "--requests", "{w}/r-array.jsonl", "--out", "{w}/o"], 2,
     "r-array.jsonl:1 is not a JSON object"),
    ("edit subject of special tokens only", ["edit", *MD, "--prompt", "{{}} was born in", "--subject", "<|endoftext|>",
                                             "--target", "Lisbon", "--out", "{w}/o"], 2, "the subject '<|endoftext|>' is only special tokens"),
    ("edit target of special tokens only", ["edit", *MD, *S[:4], "--target", "<|endoftext|><|endoftext|>", "--out", "{w}/o"], 2,
     "is only special tokens"),
    ("edit subject written twice without {}", ["edit", *MD, "--prompt", "Thathai met Thathai in", "--subject", "Thathai",
                                               "--target", "Lisbon", "--out", "{w}/o"], 2, "appears 2 times in the prompt"),
    # ---- paths named in files stay inside the file's folder
    ("edit model card stats_corpus ../../etc/shadow", ["edit", "--model", "{w}/card-shadow", *S, "--out", "{w}/o"], 2,
     "stats_corpus '../../../../../../etc/shadow' is not a path inside"),
    ("generate model card cases /etc/passwd", ["generate", "--model", "{w}/card-abs", "--prompt", "Hi"], 2,
     "cases '/etc/passwd' is not a path inside"),
    ("registry validate suite text_file ../..", ["registry", "validate", "{w}/p", *MD, "--suite", "{w}/suite-up.jsonl",
                                                 "--registry", "{w}/reg.db"], 2, "suite-up.jsonl:2: text_file '../../../../etc/passwd' is not a path"),
    ("registry validate suite text_file absolute", ["registry", "validate", "{w}/p", *MD, "--suite", "{w}/suite-abs.jsonl",
                                                    "--registry", "{w}/reg.db"], 2, "text_file '/etc/passwd' is not a path inside"),
    # ---- outputs that would lose data: --out equal to, inside or holding an input
    ("edit --out is --model", ["edit", "--model", "{w}/tm", *S, "--out", "{w}/tm", "--force"], 2, "--out {w}/tm is --model {w}/tm itself"),
    ("edit --out inside --model", ["edit", "--model", "{w}/tm", *S, "--out", "{w}/tm/p"], 2, "is inside --model"),
    ("edit --out holds --model", ["edit", "--model", "{w}/nest/tm", *S, "--out", "{w}/nest", "--force"], 2, "holds --model"),
    ("edit --out holds the requests file", ["edit", *MD, "--requests", "{w}/nest/req.jsonl", "--out", "{w}/nest",
                                                  "--force"], 2, "holds --requests"),
    ("apply --model D --out D --force", ["apply", "--model", "{w}/tm", "--patch", "{w}/p", "--out", "{w}/tm", "--force"], 2,
     "is --model {w}/tm itself"),
    ("apply --out . --force", ["apply", *MD, "--patch", "{w}/p", "--out", ".", "--force"], 2, "--out . is the current folder"),
    ("apply --out holds --model", ["apply", "--model", "{w}/nest/tm", "--patch", "{w}/p", "--out", "{w}/nest", "--force"], 2,
     "holds --model"),
    ("apply --out is the --patch", ["apply", *MD, "--patch", "{w}/p", "--out", "{w}/p", "--force"], 2, "is --patch {w}/p itself"),
    ("revert --out is --model", ["revert", "--model", "{w}/applied", "--out", "{w}/applied", "--force"], 2, "is --model"),
    ("export --out inside --model", ["export", "--model", "{w}/tm", "--patch", "{w}/p", "--out", "{w}/tm/x"], 2, "is inside --model"),
    ("registry build --out is --model", ["registry", "build", "--model", "{w}/tm", "--out", "{w}/tm", "--force",
                                         "--registry", "{w}/reg.db"], 2, "is --model"),
    ("registry build --out holds the registry", ["registry", "build", *MD, "--out", "{w}/rg", "--force", "--registry",
                                                 "{w}/rg/reg.db"], 2, "holds the registry"),
    ("eval --out is the case file", ["eval", *MD, "--cases", "{w}/cases.jsonl", "--patch", "{w}/p", "--out", "{w}/cases.jsonl"], 2,
     "is --cases"),
    ("eval --out inside --model", ["eval", "--model", "{w}/tm", "--cases", "{w}/cases.jsonl", "--patch", "{w}/p", "--out",
                                   "{w}/tm/config.json"], 2, "is inside --model"),
    ("bench sequential --out inside --model", ["bench", "sequential", "--model", "{w}/tm", "--cases", "{M}", "--n", "2",
                                               "--out", "{w}/tm/seq"], 2, "is inside --model"),
    ("trace --out inside --model", ["trace", "--model", "{w}/tm", "--prompt", "{{}} was born in", "--subject", "Thathai",
                                    "--out", "{w}/tm/t"], 2, "is inside --model"),
    # ---- a model folder whose config does not match its weights, or not the patch's base
    ("apply config with fewer layers than its weights", ["apply", "--model", "{w}/fewer-layers", "--patch", "{w}/p", "--out",
                                                         "{w}/o"], 2, "tensor(s) that config.json does not use"),
    ("apply config with another activation", ["apply", "--model", "{w}/other-activation", "--patch", "{w}/ptm", "--out", "{w}/o"],
     2, 'config differs from this one\'s (activation_function: "gelu_new" -> "relu")'),
    ("export config with another activation", ["export", "--model", "{w}/other-activation", "--patch", "{w}/ptm", "--out",
                                               "{w}/o"], 2, "--allow-config-change"),
    ("generate config with another n_embd", ["generate", "--model", "{w}/other-width", "--prompt", "Hi"], 2,
     "config.json makes it"),
    # ---- patches for another model, forged or old
    ("apply a forged patch that edits lm_head", ["apply", *MD, "--patch", "{w}/lmhead", "--out", "{w}/o"], 2,
     "edit 0 writes 'lm_head', which is not layer 0's edited projection"),
    ("generate with a forged lm_head patch", ["generate", *MD, "--prompt", "Hi", "--patch", "{w}/lmhead"], 2, "writes 'lm_head'"),
    ("apply a GPT-2 patch onto a Llama", ["apply", "--model", "{w}/llama", "--patch", "{w}/p", "--out", "{w}/o"], 2,
     "this patch was made for a gpt2 with 4 layers, not for this llama"),
    ("apply a Llama patch onto GPT-2", ["apply", *MD, "--patch", "{w}/lp", "--out", "{w}/o"], 2, "this patch was made for a llama"),
    ("registry release onto another model", ["registry", "release", "{w}/p", "--model", "{w}/llama", "--registry", "{w}/reg3.db"],
     2, "this patch was made for a gpt2"),
    ("show a schema-1 patch says it is unverified", ["show", "{w}/schema1"], 0, "UNVERIFIED: a schema-1 patch carries no digests"),
    # ---- the registry and the command line
    ("registry --registry X list", ["registry", "--registry", "{w}/none.db", "list"], 2, "no registry at {w}/none.db"),
    ("registry list while another process holds the lock", ["registry", "list", "--registry", "{w}/locked.db"], 2,
     "is locked by another process"),
    ("generate --max-new-tokens 100000", ["generate", *MD, "--prompt", "Hi", "--max-new-tokens", "100000"], 0,
     "generation stops after at most"),
    # ---- found by trying again as a hostile user (none of them in the list)
    ("edit --arch-spec whose blocks are the embedding",
     [*E, "--arch-spec", '{{"layers": "transformer.wte", "mlp": "transformer.wte.{{}}.mlp", "proj": "transformer.wte.{{}}.mlp.c_proj", '
                         '"attn": "transformer.wte.{{}}.attn", "embed": "transformer.wte"}}'], 2, "not the list of decoder blocks"),
    ("apply onto a folder whose rankone record is malformed", ["apply", "--model", "{w}/bad-record", "--patch", "{w}/p", "--out",
                                                               "{w}/o"], 2, "applied.json is not a rankone record"),
    ("generate config.json nested 100,000 deep", ["generate", "--model", "{w}/config-deep", "--prompt", "Hi"], 2,
     "cannot read {w}/config-deep/config.json"),
    ("registry list on another program's SQLite file", ["registry", "list", "--registry", "{w}/foreign.db"], 2,
     "is not a rankone registry: its table"),
    pytest.param([*E, "--stats-corpus", "{w}/corpus.fifo", "--quiet"], 2, "is not a regular file or a folder",
                 id="edit --stats-corpus a FIFO (would block forever)", marks=NEEDS_FIFO),
    ("registry validate a suite prompt longer than the context", ["registry", "validate", "{w}/p", *MD, "--suite",
                                                                  "{w}/suite-long.jsonl", "--registry", "{w}/reg.db"], 2,
     "suite-long.jsonl:1: the prompt is"),
    ("trace a case prompt longer than the context", ["trace", *MD, "--cases", "{w}/cases-long.jsonl", "--quiet", "--out",
                                                     "{w}/t"], 2, "the model answers none of the 1 facts"),
    ("edit a billion context prefixes", [*E, "--hparams", '{{"prefix_spec": [[5, 1000000000]]}}'], 2, "context prefixes"),
    ("edit a trillion sampled corpus tokens", [*E, "--hparams", '{{"sampled_corpus_tokens": 1000000000000}}'], 2,
     "sampled_corpus_tokens must be between 1 and"),
    ("revert a Llama patch on GPT-2", ["revert", "--model", "{w}/applied", "--patch", "{w}/lp", "--out", "{w}/o"], 2,
     "this patch was made for a llama"),
    ("testbed build --out .", ["testbed", "build", "--out", "."], 2, "is the current folder"),
    ("testbed build --time-budget inf", ["testbed", "build", "--out", "{w}/tb", "--time-budget", "inf"], 2,
     "--time-budget must be a positive number of seconds, not inf"),
    # ---- heal: probes, policy, server
    ("heal probes not JSON", ["heal", "--registry", "{w}/reg.db", "--probes", "{w}/probes-bad.jsonl", "--once"], 2,
     "probes-bad.jsonl:1 is not valid JSON"),
    ("heal probe with a misspelt field", ["heal", "--registry", "{w}/reg.db", "--probes", "{w}/probes-typo.jsonl", "--once"], 2,
     "a probe has no field(s) ['expekted']"),
    ("heal probes nested 100,000 deep", ["heal", "--registry", "{w}/reg.db", "--probes", "{w}/probes-deep.jsonl", "--once"], 2,
     "probes-deep.jsonl"),
    ("heal probes missing", ["heal", "--registry", "{w}/reg.db", "--probes", "{w}/nope.jsonl", "--once"], 2,
     "probe file {w}/nope.jsonl does not exist"),
    ("heal policy value of the wrong type", ["heal", "--registry", "{w}/reg.db", "--probes", "{w}/probes-ok.jsonl", "--policy",
                                             "{w}/heal-words.json", "--once"], 2, "k_users must be a whole number"),
    ("heal policy an array", ["heal", "--registry", "{w}/reg.db", "--probes", "{w}/probes-ok.jsonl", "--policy",
                              "{w}/heal-array.json", "--once"], 2, "must be a JSON object"),
    ("heal canary steps that fall", ["heal", "--registry", "{w}/reg.db", "--probes", "{w}/probes-ok.jsonl", "--policy",
                                     "{w}/heal-steps.json", "--once"], 2, "canary_steps must rise strictly"),
    ("heal --server without a token", ["heal", "--registry", "{w}/reg.db", "--probes", "{w}/probes-ok.jsonl", "--server",
                                       "http://127.0.0.1:9", "--once"], 2, "--server needs the server's admin token"),
    ("heal registry missing", ["heal", "--registry", "{w}/none.db", "--probes", "{w}/probes-ok.jsonl", "--once"], 2,
     "no registry at {w}/none.db"),
    ("heal --once and --watch", ["heal", "--registry", "{w}/reg.db", "--probes", "{w}/probes-ok.jsonl", "--once", "--watch"], 2,
     "not allowed with argument"),
    # ---- legal but suspicious: a warning, and the work goes on (written outside the hashed folders)
    ("edit a 4-token statistics corpus (warns)", ["edit", *MD, *S, "--stats-corpus", "{w}/tiny-corpus.txt", "--hparams",
                                                  QUICK, "--quiet", "--out", "{x}/tiny"], 0, "tokens for 512-dimensional keys"),
    ("edit a binary statistics corpus (warns)", ["edit", *MD, *S, "--stats-corpus", "{w}/binary-corpus.txt", "--hparams",
                                                 QUICK, "--quiet", "--out", "{x}/binary"], 0, "does not look like text"),
]
