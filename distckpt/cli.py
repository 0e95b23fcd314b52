"""The ``distckpt`` command line.  It only parses arguments, calls the library and prints.

Exit codes: 0 success; 1 any error (one ``error: ...`` line per problem on
stderr, no traceback unless ``--debug``), ``verify`` with any defect included;
2 usage errors (a missing required option, an unknown flag, options that
contradict each other), with the subcommand's usage.  Output cut short by a
closed pipe (``distckpt inspect X | head -1``) ends quietly.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import textwrap
from typing import Any

__all__ = ["main", "build_parser"]


def _common(p: argparse.ArgumentParser, *, src: bool = True) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    g.add_argument("--config", metavar="FILE", help="YAML job config; flags on the command line override it")
    g.add_argument(
        "--storage-options",
        metavar="JSON",
        type=_json_arg,
        help='fsspec storage options as JSON, e.g. \'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'',
    )
    if src:
        g.add_argument("--src-strategy", metavar="FILE", help="parallel strategy SRC was saved with (file, dir or URL)")
        g.add_argument("--src-iteration", metavar="N", type=int,
                       help="a MindFormers checkpoint root: read iteration N instead of the tracker's")
        g.add_argument("--model", metavar="NAME",
                       help="SRC is a HuggingFace model of this family (e.g. qwen3): read it with MindFormers' names "
                       "and fused weights (merge --format hf: the family to export as)")
        g.add_argument("--qkv-layout", choices=["interleaved", "contiguous"], help="fused QKV layout (default interleaved)")
        g.add_argument("--ffn-layout", choices=["interleaved", "contiguous"], help="fused gate/up layout (default interleaved)")


def _json_arg(s: str) -> dict:
    from .jsonutil import loads

    try:
        v = loads(s, where="--storage-options")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return v


SRC_HELP = (
    "a distckpt checkpoint, a MindSpore distributed directory (rank_*/ with .ckpt or .safetensors), "
    "one .ckpt or .safetensors file, or a MindFormers save_pretrained directory; any fsspec URL"
)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="distckpt",
        description="Distributed checkpoints for MindSpore / MindFormers: inspect, verify, merge, split, reshard.",
        formatter_class=fmt,
        epilog=textwrap.dedent(
            """\
            examples (after `bash launch/quickstart.sh`, from the checkout):
              distckpt reshard output/quickstart/ckpt output/tp2_native --dst-strategy output/quickstart/strategy_tp2.ckpt --format ckpt
              distckpt merge output/quickstart/ckpt s3://my-bucket/run1/step_5 --format distckpt --storage-options '{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}'
              distckpt verify s3://my-bucket/run1/step_5 --storage-options '{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}'
            """
        ),
    )
    p.add_argument("--version", action="version", version="distckpt " + _version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser(
        "inspect",
        help="list tensors, dtypes, shapes, chunks and layouts",
        formatter_class=fmt,
        epilog="examples:\n  distckpt inspect output/quickstart/ckpt\n  distckpt inspect output/quickstart/ckpt --json\n"
        "  distckpt inspect output/quickstart/ckpt --plot w1 --out output/w1.png",
    )
    s.add_argument("src", metavar="SRC", help=SRC_HELP)
    s.add_argument("--json", action="store_true", help="machine-readable output (schema in README)")
    s.add_argument("--plot", metavar="NAME", help="draw how tensor NAME is cut across ranks")
    s.add_argument("--out", metavar="PNG", help="where --plot writes its picture (default: NAME.png)")
    _common(s)

    s = sub.add_parser(
        "verify",
        help="check coverage, checksums and readability; exit 1 on any defect",
        formatter_class=fmt,
        epilog="examples:\n  distckpt verify output/quickstart/ckpt\n  distckpt verify output/quickstart/ckpt_tp2 --json\n"
        "  distckpt verify output/tp2_native --src-strategy output/quickstart/strategy_tp2.ckpt",
    )
    s.add_argument("src", metavar="SRC", help=SRC_HELP)
    s.add_argument("--json", action="store_true", help="print the report as JSON (every problem found)")
    _common(s)

    s = sub.add_parser(
        "merge",
        help="merge into one .ckpt/.safetensors file or a MindFormers-ready directory",
        formatter_class=fmt,
        epilog="examples:\n  distckpt merge output/quickstart/ckpt output/model.safetensors\n"
        "  distckpt merge output/quickstart/ckpt output/merged/ --max-shard-size 64KB\n"
        "  distckpt merge output/tp2_native output/from_native.ckpt --src-strategy output/quickstart/strategy_tp2.ckpt",
    )
    s.add_argument("src", metavar="SRC", help=SRC_HELP)
    s.add_argument("dst", metavar="DST", help="a .ckpt or .safetensors file, or a directory")
    s.add_argument("--format", choices=["ckpt", "safetensors", "distckpt", "mindformers", "hf"],
                   help="output format (default from DST)")
    s.add_argument("--max-shard-size", metavar="SIZE", help="shard a directory output, e.g. 5GB")
    s.add_argument("--hf-config", metavar="FILE", help="--format hf: the config.json to write (default: derived from SRC)")
    s.add_argument("--dst-iteration", metavar="N", type=int, help="--format mindformers: the iteration to write")
    s.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    s.add_argument("--no-verify", dest="verify", action="store_false", help="skip checksum verification")
    s.add_argument("--strict", action="store_true", help="fail if the strategy names parameters no file holds")
    _common(s)

    relayout = {
        "split": ("cut one checkpoint into per-rank shards", "output/quickstart/merged.ckpt", "output/split_tp4",
                  "output/quickstart/strategy_tp4.ckpt"),
        "reshard": ("move a checkpoint to another layout", "output/quickstart/ckpt", "output/tp2",
                    "output/quickstart/strategy_tp2.ckpt"),
    }
    for verb, (helptext, ex_src, ex_dst, ex_strategy) in relayout.items():
        s = sub.add_parser(
            verb,
            help=helptext,
            formatter_class=fmt,
            epilog=f"examples:\n  distckpt {verb} {ex_src} {ex_dst} --dst-strategy {ex_strategy}\n"
            f"  distckpt {verb} {ex_src} {ex_dst}_ckpt --dst-strategy {ex_strategy} --format ckpt --prefix step5_",
        )
        s.add_argument("src", metavar="SRC", help=SRC_HELP)
        s.add_argument("dst", metavar="DST", help="output directory")
        s.add_argument("--dst-strategy", metavar="FILE", help="strategy of the target layout (required; or strategy.dst in --config)")
        s.add_argument("--format", choices=["distckpt", "ckpt", "safetensors", "mindformers"],
                       help="output format (default distckpt)")
        s.add_argument("--prefix", help="per-rank file prefix for --format ckpt/safetensors (default checkpoint_)")
        s.add_argument("--dst-iteration", metavar="N", type=int, help="--format mindformers: the iteration to write")
        s.add_argument("--plain", action="store_true",
                       help="--format mindformers: one file per rank, replicas included (default: each shard once)")
        s.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        s.add_argument("--no-verify", dest="verify", action="store_false", help="skip checksum verification")
        s.add_argument("--strict", action="store_true", help="fail if the strategy names parameters no file holds")
        _common(s)

    s = sub.add_parser("finalize", help="commit a rank-mode save once every rank has written", formatter_class=fmt,
                       epilog="example (once every rank ran distckpt.save(state, 'output/rank_mode', strategy=..., rank=r)):\n"
                       "  distckpt finalize output/rank_mode")
    s.add_argument("path", metavar="PATH")
    _common(s, src=False)

    s = sub.add_parser("gc", help="remove debris of failed saves (only what distckpt can prove it wrote)",
                       formatter_class=fmt, epilog="example:\n  distckpt gc output/quickstart/ckpt --dry-run")
    s.add_argument("path", metavar="PATH")
    s.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    _common(s, src=False)

    s = sub.add_parser("list", help="committed steps of a CheckpointManager root", formatter_class=fmt,
                       epilog="example (the root given to distckpt.CheckpointManager):\n  distckpt list output/run --json")
    s.add_argument("root", metavar="ROOT")
    s.add_argument("--json", action="store_true")
    _common(s, src=False)
    return p


def _version() -> str:
    from . import __version__

    return __version__


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_inspect(info: dict) -> None:
    print(f"{info['src']}  ({info['kind']}, {info['world_size']} rank(s), {len(info['tensors'])} tensors, "
          f"{_human(info['total_bytes'])})")
    rows = [("tensor", "dtype", "shape", "chunks", "bytes", "layout", "replicas")]
    for t in info["tensors"]:
        lay = t.get("layout")
        lay_s = "-" if not lay else f"dev{lay['dev_matrix']} map{lay['tensor_map']}" + (
            f" opt{lay['opt_weight_shard_size']}" if lay.get("opt_weight_shard_size") else "") + (
            f" stage{lay['stages']}" if lay.get("stages") and lay["stages"] != [0] else "")
        rows.append((t["name"], t["dtype"], "x".join(map(str, t["shape"])) or "()", str(t["chunks"]),
                     _human(t["bytes"]), lay_s, str(t.get("replicas", 1))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if info["values"]:
        print("values: " + ", ".join(f"{k}={v!r}" for k, v in info["values"].items()))


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """Options from ``--config FILE`` (if any), overridden by the flags that were given."""
    opts: dict[str, Any] = {}
    if getattr(args, "config", None):
        from .jobconfig import load_config

        cfg = load_config(args.config)
        ck, strat = cfg["checkpoint"], cfg["strategy"]
        opts = {
            "storage_options": ck.get("storage_options") or None,
            "src_strategy": strat.get("src"),
            "dst_strategy": strat.get("dst"),
            "max_shard_size": ck.get("max_shard_size"),
            "prefix": ck.get("prefix"),
        }
        if args.command in ("split", "reshard"):
            opts["format"] = ck.get("format")
    for key in ("storage_options", "src_strategy", "dst_strategy", "max_shard_size", "prefix", "format"):
        flag = getattr(args, key, None)
        if flag is not None:
            opts[key] = flag
    return opts


def _src_options(args: argparse.Namespace) -> dict[str, Any]:
    """The SRC selectors given on the command line (MindFormers iteration, HF model map)."""
    got = {"iteration": getattr(args, "src_iteration", None), "model": getattr(args, "model", None),
           "qkv_layout": getattr(args, "qkv_layout", None), "ffn_layout": getattr(args, "ffn_layout", None)}
    return {k: v for k, v in got.items() if v is not None}


def _dump(obj: Any) -> None:
    from .jsonutil import dumps

    print(dumps(obj, indent=2, default=str))


def _run(args: argparse.Namespace) -> int:
    from . import api
    from .errors import UsageError

    opts = _options(args)
    so = opts.get("storage_options")
    cmd = args.command
    quiet = bool(args.quiet)
    if cmd == "inspect":
        if args.plot:
            from .plot import plot_tensor

            out = plot_tensor(args.src, args.plot, out=args.out, src_strategy=opts.get("src_strategy"), storage_options=so)
            print(f"wrote {out}")
            return 0
        info = api.inspect(args.src, src_strategy=opts.get("src_strategy"), storage_options=so, **_src_options(args))
        if args.json:
            _dump(info)
        else:
            _print_inspect(info)
        return 0
    if cmd == "verify":
        rep = api.verify(args.src, src_strategy=opts.get("src_strategy"), storage_options=so, quiet=quiet,
                         raise_errors=False, **_src_options(args))
        if args.json:
            _dump(rep)
        else:
            for p in rep["problems"]:
                print("error: " + p["what"], file=sys.stderr)
            if rep["ok"] and not quiet:
                note = "" if rep.get("checksums", True) else " (this format has no checksums: structure only)"
                print(f"ok: {rep['tensors']} tensors, {_human(rep['bytes_checked'])} checked in {rep['src']}{note}")
        return 0 if rep["ok"] else 1
    if cmd == "merge":
        rep = api.merge(args.src, args.dst, format=opts.get("format"), max_shard_size=opts.get("max_shard_size"),
                        src_strategy=opts.get("src_strategy"), overwrite=args.overwrite, storage_options=so,
                        verify=args.verify, quiet=quiet, strict=args.strict, hf_config=args.hf_config,
                        dst_iteration=args.dst_iteration, **_src_options(args))
        _report(rep, quiet)
        return 0
    if cmd in ("split", "reshard"):
        if opts.get("dst_strategy") is None:
            raise UsageError(f"{cmd} needs --dst-strategy FILE (or strategy.dst in --config)")
        fn = api.split if cmd == "split" else api.reshard
        rep = fn(args.src, args.dst, dst_strategy=opts.get("dst_strategy"), format=opts.get("format") or "distckpt",
                 prefix=opts.get("prefix") or "checkpoint_", src_strategy=opts.get("src_strategy"),
                 overwrite=args.overwrite, storage_options=so, verify=args.verify, quiet=quiet, strict=args.strict,
                 dst_iteration=args.dst_iteration, plain=args.plain, **_src_options(args))
        _report(rep, quiet)
        return 0
    if cmd == "finalize":
        _report(api.finalize(args.path, storage_options=so), quiet)
        return 0
    if cmd == "gc":
        removed = api.gc(args.path, storage_options=so, dry_run=args.dry_run)
        if not quiet:
            for n in removed:
                print(("would remove " if args.dry_run else "removed ") + n)
        return 0
    if cmd == "list":
        from .manager import list_checkpoints

        rows = list_checkpoints(args.root, storage_options=so)
        if args.json and rows.get("kind") == "mindformers":  # one object per iteration
            _dump([{k: v for k, v in row.items() if k != "line"} for row in rows["entries"]])
        elif args.json:
            _dump(rows)
        else:
            for row in rows["entries"]:
                print(row["line"])
        return 0
    raise AssertionError(cmd)


def _report(rep: dict[str, Any], quiet: bool) -> None:
    if quiet or rep.get("ranks", 1) > 1 and _world_rank() != 0:  # under mpirun, rank 0 speaks for the job
        return
    parts = [f"{k}={v}" for k, v in rep.items() if k not in ("files", "read")]
    if "read" in rep:
        r = rep["read"]
        parts.append(f"read={_human(r['bytes_read'])} (x{r['ratio']} of needed)")
    print("done: " + " ".join(parts))


def _world_rank() -> int:
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        raw = os.environ.get(var)
        if raw and raw.isdigit():
            return int(raw)
    return 0


def describe_error(exc: BaseException) -> str:
    """One line, in words: distckpt's own message, or an OS error named by its file and cause (no class names)."""
    from .errors import DistCkptError

    if isinstance(exc, DistCkptError):
        msg = str(exc)
    elif isinstance(exc, MemoryError):
        msg = f"out of memory ({exc}); the input claims more than this machine can hold"
    elif isinstance(exc, OSError):
        what = (exc.strerror or os.strerror(exc.errno)) if exc.errno else (exc.strerror or str(exc))
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            what = "no space left on the destination device (or quota exceeded)"
        where = exc.filename if exc.filename is not None else ""
        if exc.errno == errno.EEXIST and where and os.path.isfile(where):
            what = "is a file, where a directory was needed"  # making DST's parent directories
        msg = f"{where}: {what}" if where else str(what or exc)
    else:
        msg = str(exc) or type(exc).__name__
    return " ".join(msg.split())


def main(argv: list[str] | None = None) -> int:
    from .errors import UsageError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    sub = _subparser(parser, args.command)
    if extra:
        sub.error(f"unrecognized arguments: {' '.join(extra)}")  # the subcommand's usage, exit 2
    from .storage import handle_termination

    try:
        with handle_termination():
            return _run(args)
    except UsageError as exc:
        if getattr(args, "debug", False):
            raise
        sub.print_usage(sys.stderr)
        print(f"{sub.prog}: error: " + describe_error(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:
        _quiet_broken_pipe()
        return 0
    except Exception as exc:  # noqa: BLE001 - the CLI never shows a traceback without --debug
        if getattr(args, "debug", False):
            raise
        print("error: " + describe_error(exc), file=sys.stderr)
        return 1


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    return parser


def _quiet_broken_pipe() -> None:
    """The reader went away: stop writing, and keep Python from complaining at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    raise SystemExit(main())
