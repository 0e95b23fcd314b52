"""The ``distckpt`` command line.  It only parses arguments and calls the library.

Exit codes: 0 success; 1 any error (one ``error: ...`` line on stderr, no
traceback unless ``--debug``), ``verify`` included; 2 usage errors.
"""

from __future__ import annotations

import argparse
import json
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


def _json_arg(s: str) -> dict:
    try:
        v = json.loads(s)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
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
            examples:
              distckpt inspect out/ckpt
              distckpt merge out/native merged.ckpt --src-strategy strategy.ckpt
              distckpt reshard out/ckpt out/ckpt_tp2 --dst-strategy tp2.ckpt --format ckpt
              distckpt verify s3://bucket/run1/step_100 --storage-options '{"anon": false}'
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
        epilog="examples:\n  distckpt inspect out/ckpt\n  distckpt inspect out/ckpt --json\n"
        "  distckpt inspect out/ckpt --plot model.layers.0.attention.wq.weight --out grid.png",
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
        epilog="examples:\n  distckpt verify out/ckpt\n  distckpt verify out/native --src-strategy strategy.ckpt",
    )
    s.add_argument("src", metavar="SRC", help=SRC_HELP)
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    _common(s)

    s = sub.add_parser(
        "merge",
        help="merge into one .ckpt/.safetensors file or a MindFormers-ready directory",
        formatter_class=fmt,
        epilog="examples:\n  distckpt merge out/ckpt model.ckpt\n  distckpt merge out/native merged/ --max-shard-size 5GB\n"
        "  distckpt merge out/ckpt model.safetensors",
    )
    s.add_argument("src", metavar="SRC", help=SRC_HELP)
    s.add_argument("dst", metavar="DST", help="a .ckpt or .safetensors file, or a directory")
    s.add_argument("--format", choices=["ckpt", "safetensors", "distckpt"], help="output format (default from DST)")
    s.add_argument("--max-shard-size", metavar="SIZE", help="shard a directory output, e.g. 5GB")
    s.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    s.add_argument("--no-verify", dest="verify", action="store_false", help="skip checksum verification")
    _common(s)

    for verb, helptext in (("split", "cut one checkpoint into per-rank shards"), ("reshard", "move a checkpoint to another layout")):
        s = sub.add_parser(
            verb,
            help=helptext,
            formatter_class=fmt,
            epilog=f"examples:\n  distckpt {verb} SRC DST --dst-strategy strategy.ckpt\n"
            f"  distckpt {verb} SRC DST --dst-strategy strategy.ckpt --format ckpt --prefix checkpoint_",
        )
        s.add_argument("src", metavar="SRC", help=SRC_HELP)
        s.add_argument("dst", metavar="DST", help="output directory")
        s.add_argument("--dst-strategy", metavar="FILE", help="strategy of the target layout")
        s.add_argument("--format", choices=["distckpt", "ckpt", "safetensors"], help="output format (default distckpt)")
        s.add_argument("--prefix", help="per-rank file prefix for --format ckpt/safetensors (default checkpoint_)")
        s.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        s.add_argument("--no-verify", dest="verify", action="store_false", help="skip checksum verification")
        _common(s)

    s = sub.add_parser("finalize", help="commit a rank-mode save once every rank has written", formatter_class=fmt,
                       epilog="example:\n  distckpt finalize out/ckpt")
    s.add_argument("path", metavar="PATH")
    _common(s, src=False)

    s = sub.add_parser("gc", help="remove debris of failed saves", formatter_class=fmt,
                       epilog="example:\n  distckpt gc out/ckpt --dry-run")
    s.add_argument("path", metavar="PATH")
    s.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    _common(s, src=False)

    s = sub.add_parser("list", help="committed steps of a CheckpointManager root", formatter_class=fmt,
                       epilog="example:\n  distckpt list out/run1 --json")
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
        from .config import load_config

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


def _run(args: argparse.Namespace) -> int:
    from . import api

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
        info = api.inspect(args.src, src_strategy=opts.get("src_strategy"), storage_options=so)
        if args.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            _print_inspect(info)
        return 0
    if cmd == "verify":
        rep = api.verify(args.src, src_strategy=opts.get("src_strategy"), storage_options=so, quiet=quiet)
        if args.json:
            print(json.dumps(rep, indent=2))
        elif not quiet:
            print(f"ok: {rep['tensors']} tensors, {_human(rep['bytes_checked'])} checked in {rep['src']}")
        return 0
    if cmd == "merge":
        rep = api.merge(args.src, args.dst, format=opts.get("format"), max_shard_size=opts.get("max_shard_size"),
                        src_strategy=opts.get("src_strategy"), overwrite=args.overwrite, storage_options=so,
                        verify=args.verify, quiet=quiet)
        _report(rep, quiet)
        return 0
    if cmd in ("split", "reshard"):
        fn = api.split if cmd == "split" else api.reshard
        rep = fn(args.src, args.dst, dst_strategy=opts.get("dst_strategy"), format=opts.get("format") or "distckpt",
                 prefix=opts.get("prefix") or "checkpoint_", src_strategy=opts.get("src_strategy"),
                 overwrite=args.overwrite, storage_options=so, verify=args.verify, quiet=quiet)
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
        from .manager import CheckpointManager

        mgr = CheckpointManager(args.root, storage_options=so)
        steps = mgr.all_steps()
        if args.json:
            print(json.dumps({"root": args.root, "steps": steps, "latest": mgr.latest_step()}))
        else:
            for s in steps:
                print(s)
        return 0
    raise AssertionError(cmd)


def _report(rep: dict[str, Any], quiet: bool) -> None:
    if quiet:
        return
    parts = [f"{k}={v}" for k, v in rep.items() if k not in ("files", "read")]
    if "read" in rep:
        r = rep["read"]
        parts.append(f"read={_human(r['bytes_read'])} (x{r['ratio']} of needed)")
    print("done: " + " ".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the CLI never shows a traceback without --debug
        if getattr(args, "debug", False):
            raise
        from .errors import DistCkptError

        msg = str(exc) if isinstance(exc, DistCkptError) else f"{type(exc).__name__}: {exc}"
        print("error: " + " ".join(msg.split()), file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
