"""The `rankone` command: a thin layer over the Python API. Bad input: one line, exit 2."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sqlite3
import sys
import warnings
from typing import Any, Callable

from rankone.cli.common import (hparams_from, hparams_help, layer_arg, load, load_requests, methods_help, model_args,
                                 positive_int, text_arg)
from rankone.core.errors import RankoneError
from rankone.core.text import shown
from rankone.methods.base import DEFAULT_METHOD, METHODS

# Feature modules that add their own sub-commands with `register(subparsers)`.
PLUGINS = ("rankone.cli.testbed", "rankone.cli.eval", "rankone.cli.registry", "rankone.cli.trace", "rankone.cli.serve",
           "rankone.cli.heal")


# ---- commands --------------------------------------------------------------------------------


def cmd_edit(args: argparse.Namespace) -> int:
    from rankone.core.atomic import check_out_dir
    from rankone.core.tokens import EditRequest
    from rankone.edit.editor import Editor, check_request, outcomes_of
    from rankone.methods.base import method, resolve_settings

    if args.requests and (args.prompt or args.subject or args.target):
        raise RankoneError("give either --requests FILE or --prompt/--subject/--target, not both")
    if args.requests:
        reqs = load_requests(args.requests)
    else:
        if not (args.prompt and args.subject is not None and args.target is not None):
            raise RankoneError("an edit needs --prompt, --subject and --target (or --requests FILE.jsonl)")
        reqs = [EditRequest.create(args.prompt, args.subject, args.target)]
    given = hparams_from(args)
    m = method(given.get("method"))
    if args.registry is not None and m.one_at_a_time:
        raise RankoneError(f"--registry (edit on top of the released patches) is for the batch methods, not {m.name}; "
                           "give e.g. --method alphaedit")
    check_out_dir(args.out, args.force, [("--model", args.model), ("--requests", args.requests),
                                         ("--stats-corpus", args.stats_corpus)])
    reg = _open_registry(args.registry) if args.registry is not None else None
    handle = load(args)
    choice = None
    if args.layer == "auto":
        from rankone.eval.layer_sweep import choose_edit_layer

        choice = choose_edit_layer(handle, reqs, None, progress=not args.quiet)
        if not args.quiet:
            print(choice.explain())
        given["layer"] = choice.layer
    settings = resolve_settings(handle, given)  # paper ← model card ← yours, once
    for r in reqs:  # every alignment or length problem surfaces before any optimisation
        check_request(handle, r, settings)
    ed = Editor(handle, settings, args.stats_corpus, progress=not args.quiet)
    if choice is not None:
        ed.notes["layer_choice"] = choice.evidence()
    if reg is not None:  # the registry's base, then its release: statistics from the base, keys kept
        with reg:
            reg.check_model(handle)
            ed.continue_from([reg.load_patch(r.id) for r in reg.released()])
    patch = ed.edit(reqs, author=args.author, reason=args.reason)
    outs = outcomes_of(patch)
    missed = [o for _, o in outs if not o["reached"]]
    if missed and args.require_success:
        print(f"rankone: error: {len(missed)} of {len(outs)} edit(s) did not reach the target (see the warnings "
              f"above); nothing written (--require-success)", file=sys.stderr)
        return 1
    patch.save(args.out, overwrite=args.force)
    one = ed.method.one_at_a_time
    if not one:
        print(f"{settings.method}: {len(reqs)} request(s) as one batch: "
              + ", ".join(f"{e.module} rank {e.rank} |Δ|={e.delta_fro:.4g}" for e in patch.edits))
    for (r, o), e in zip(outs, patch.edits if one else [None] * len(outs)):
        print(("" if e is None else f"edited {e.module}: ") + shown(f"{r['prompt'].replace('{}', r['subject'])} -> {r['target']}")
              + ("" if e is None else f"  |Δ|={e.delta_fro:.4g}") + f"  p(target)={o['p_target']:.3f}  "
              f"the model now says {o['answer']!r}" + ("" if o["reached"] else "  (target NOT reached)"))
    print(f"wrote {args.out} ({len(patch.edits)} edit(s)" + (f", {len(missed)} not reaching the target" if missed else "") + ")")
    return 0


def _open_registry(path: str) -> Any:
    from rankone.lifecycle.registry import Registry

    return Registry(path, create=False)


def cmd_apply(args: argparse.Namespace) -> int:
    from rankone.core.atomic import check_out_dir
    from rankone.artifacts.merged import refuse_config_change, refuse_reapplied, save_merged
    from rankone.artifacts.patch import Patch, apply_patch, refuse_duplicates

    patches = [Patch.load(p) for p in args.patch]
    refuse_duplicates(patches)
    refuse_reapplied(args.model, patches)
    check_out_dir(args.out, args.force, inputs_of(args))
    handle = load(args)
    if not args.allow_config_change:
        refuse_config_change(handle, patches)
    applied = apply_patch(handle.model, patches, handle.spec)
    save_merged(handle, patches, args.patch, applied.originals, args.out, args.force)
    print(f"wrote {args.out}: {sum(len(p.edits) for p in patches)} edit(s) from {len(patches)} patch(es) applied")
    return 0


def cmd_revert(args: argparse.Namespace) -> int:
    from rankone.core.atomic import check_out_dir
    from rankone.artifacts.merged import restore_base, save_model_dir
    from rankone.artifacts.patch import Patch, refuse_duplicates, refuse_misfits, revert_patch

    patches = [Patch.load(p) for p in (args.patch or [])]
    refuse_duplicates(patches)
    check_out_dir(args.out, args.force, inputs_of(args))
    handle = load(args)
    for p in patches:  # a patch for another model names the model it was made for
        refuse_misfits(handle.model, p, handle.spec)
    if patches:
        for p in reversed(patches):
            revert_patch(handle.model, p)
    else:
        restore_base(handle.model, args.model)
    save_model_dir(handle, args.out, args.force)
    print(f"wrote {args.out}: base weights restored exactly")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from rankone.artifacts.patch import Patch

    p = Patch.load(args.patch)
    if args.json:
        print(json.dumps(p.manifest(), indent=2))
        return 0
    print(f"patch {shown(args.patch)}: {len(p.edits)} edit(s) for {shown(p.base.get('model_type', '?'))} "
          f"({shown(p.base.get('name_or_path', ''))}), made {shown(p.created_at)}; content id {p.content_id()[:16]}")
    if p.schema_version < 2:
        print("  UNVERIFIED: a schema-1 patch carries no digests, so nothing shown here is checked; apply still "
              "checks each edit's result against its recorded fingerprint")
    for i, e in enumerate(p.edits):
        r = e.request
        print(f"  [{i}] {shown(e.module)} ({shown(e.method)}, rank {e.rank}, layer {e.layer}, {shown(e.weight_dtype)}) "
              f"{r['prompt'].replace('{}', r['subject'])!r} -> {r['target']!r}"
              + (f" and {len(e.facts) - 1} more fact(s) in one batch" if len(e.facts) > 1 else "") + f"  |Δ|_F={e.delta_fro:.4g}  "
              f"base {e.sha256_before[:12]}… -> {e.sha256_after[:12]}…"
              + (f"  by {shown(e.author)}" if e.author else "") + (f": {shown(e.reason)}" if e.reason else ""))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from rankone.core.tokens import encode
    from rankone.models.generation import check_fits, context_limit, greedy
    from rankone.artifacts.patch import Patch, apply_patch, refuse_duplicates

    if not args.prompt.strip():
        raise RankoneError("the prompt is empty; give some text, e.g. --prompt 'The capital of France is'")
    patches = [Patch.load(p) for p in (args.patch or [])]
    refuse_duplicates(patches)
    handle = load(args)
    model, tok = handle
    check_fits(model, tok, args.prompt)
    room = context_limit(model) - len(encode(tok, args.prompt)[0])
    if args.max_new_tokens > room:
        print(f"rankone: note: the model reads at most {context_limit(model)} positions, so generation stops after "
              f"at most {room} new token(s), not {args.max_new_tokens}", file=sys.stderr)
    before = greedy(model, tok, args.prompt, args.max_new_tokens)
    if not patches:
        print(shown(args.prompt + before, lines=True))
        return 0
    applied = apply_patch(model, patches, handle.spec)
    after = greedy(model, tok, args.prompt, args.max_new_tokens)
    applied.revert()
    print(f"before: {shown(args.prompt + before, lines=True)}\nafter:  {shown(args.prompt + after, lines=True)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rankone.cli.demo import run_demo

    return run_demo(model_dir=args.model, device=args.device, quiet=args.quiet)


def inputs_of(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """What a writing command reads, for check_out_dir: --out may be none of them, nor hold or sit in one."""
    return [("--model", args.model)] + [("--patch", p) for p in getattr(args, "patch", None) or []]


class EscapingFormatter(logging.Formatter):
    """Log lines with control characters escaped (see rankone.core.text.shown)."""

    def format(self, record: logging.LogRecord) -> str:
        return shown(super().format(record))


# ---- parser ----------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): every sub-command's parser is of this class."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from rankone import __version__

    ap = Parser(prog="rankone", description="Rank-one model editing (ROME, r-ROME, p-ROME).")
    ap.add_argument("--version", action="version", version=f"rankone {__version__}", help="print the version and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=fn)
        return p

    p = add("edit", cmd_edit, "compute an edit and save it as a patch: rank-one edits in sequence (the ROME family), "
                              "or all requests as one batch (memit, alphaedit, emmet)")
    model_args(p)
    p.add_argument("--prompt", type=text_arg("--prompt"), help="e.g. '{} was born in' ({} marks the subject; or write the subject literally)")
    p.add_argument("--subject", type=text_arg("--subject"), help="the entity whose fact changes, as it appears in the prompt, e.g. 'Danielle Darrieux'")
    p.add_argument("--target", type=text_arg("--target"), help="the new object the model should say after the prompt, e.g. 'Rome'")
    p.add_argument("--requests", help="JSONL file of {prompt, subject, target}: edits applied in sequence, "
                                      "or one batch with a batch method (memit, alphaedit, emmet)")
    p.add_argument("--method", choices=list(METHODS), default=None, help=f"(default {DEFAULT_METHOD}) " + methods_help())
    p.add_argument("--layer", type=layer_arg, default=None,
                   help="layer to edit (for memit/alphaedit the last, critical layer of the window), or 'auto': the "
                        "best layer of this model's measured sweep (`rankone bench layers`), else causal tracing's "
                        "(default: the model card's layer, else n_layers // 8)")
    p.add_argument("--stats-corpus", help=".txt file, folder of .txt, or .jsonl with 'text' (default: corpus.txt in the model folder)")
    p.add_argument("--stats-tokens", type=int, default=None,
                   help="tokens of the corpus for the key statistics C (default 1,000,000; cached per model and layer)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampled context prefixes (default 0)")
    p.add_argument("--hparams", help=hparams_help())
    p.add_argument("--registry", default=None,
                   help="with a batch method: edit on top of this registry's released patches (--model is "
                        "its base; the statistics come from the base, as in an unbroken run); alphaedit preserves "
                        "their keys, so the batch leaves their facts as they are")
    p.add_argument("--author", type=text_arg("--author"), help="who makes the edit, recorded in the patch (default: the OS user)")
    p.add_argument("--reason", type=text_arg("--reason"), help="why, recorded in the patch (e.g. a ticket number)")
    p.add_argument("--require-success", action="store_true",
                   help="exit 1 and write nothing when an edit does not make the model answer the target")
    p.add_argument("--out", required=True, help="patch folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress display")

    p = add("apply", cmd_apply, "write a Hugging Face model folder with patches merged (exactly revertible)")
    model_args(p)
    p.add_argument("--patch", action="append", required=True, help="patch folder; repeat to apply several in order")
    p.add_argument("--out", required=True, help="model folder to write (with a rankone/ record for revert)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--allow-config-change", action="store_true",
                   help="apply even where the model's config.json differs from the one the patches were made on")

    p = add("revert", cmd_revert, "restore the exact base weights of a patched model folder")
    model_args(p)
    p.add_argument("--patch", action="append", help="the applied patches (default: use the folder's rankone record)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out")

    p = add("show", cmd_show, "describe a patch (its files are verified first)")
    p.add_argument("patch", help="patch folder")
    p.add_argument("--json", action="store_true", help="print the whole manifest")

    p = add("generate", cmd_generate, "greedy generation, before and after patches")
    model_args(p)
    p.add_argument("--patch", action="append", help="patch folder to compare with; repeat to apply several in order")
    p.add_argument("--prompt", required=True, type=text_arg("--prompt"), help="text to continue")
    p.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), default=12,
                   help="tokens to generate (default 12)")

    p = add("demo", cmd_demo, "edit a fact on the built-in model and show the answer before and after")
    p.add_argument("--model", default=None, help="a testbed model folder (default: the built-in one)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress display")

    for mod in PLUGINS:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue  # feature not built into this copy
            raise
        m.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    # Before torch loads OpenMP: its threads wait for work asleep, not spinning. Spinning threads
    # on cores that other processes share slow small operations by 10-40x (the built-in model's
    # value loop; BENCHMARKS.md, "rankone demo"); an OMP_WAIT_POLICY of the user's own wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show "Δ" (PYTHONIOENCODING=ascii) gets "\u0394"
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # deprecation notes for developers
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()  # warnings quote untrusted text (requests, cases): one line each
    handler.setFormatter(EscapingFormatter("rankone: %(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return int(args.func(args) or 0)
    except RankoneError as e:
        print(f"rankone: error: {shown(' '.join(str(e).split()))}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `rankone registry log | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 141
    except OSError as e:  # the file system said no (permissions, a full disk): one line, nothing half-written
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"rankone: error: {shown(e.strerror or e)}{shown(where)}; check the paths and free space", file=sys.stderr)
        return 2
    except sqlite3.Error as e:  # a registry database damaged behind rankone's back
        print(f"rankone: error: the registry database failed ({shown(e)}); see `rankone registry check`", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rankone: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
