"""Tables and the chart of the peer bench: ``ratios(res)`` -> ``render(res)`` (markdown) and ``plot(res, png)``.

``bench/run.py`` calls :func:`render` and :func:`plot` on the dict ``bench.peers.run_peers``
returned (plus the machine description).  Every ratio is distckpt / the other, computed from the
medians of runs made in the same invocation; a ratio <= its target passes.
"""

from __future__ import annotations

import statistics

from bench.model import GiB, MiB
from bench.peers import TARGETS, median

__all__ = ["ratios", "render", "plot", "ratio_table", "readme_block", "update_readme"]

GROUPS = ("vs PyTorch DCP", "vs mindformers.checkpoint", "vs machine limit", "cooperative load (S3)", "writers' balance",
          "async save")


def _med(runs: list[dict], key: str = "seconds"):
    return median([r[key] for r in runs]) if runs else None


def _best(runs: list[dict], key: str = "seconds"):
    return min(r[key] for r in runs) if runs else None


def ratios(res: dict) -> list[dict]:
    """One entry per compared pair: group, label, ours, theirs, ratio, target, pass (None: no target)."""
    out: list[dict] = []
    T = TARGETS

    def add(group, label, ours, theirs, target, unit="s", note="", short=""):
        ratio = ours / theirs if ours is not None and theirs else None
        ok = None if ratio is None or target is None else ratio <= target
        out.append({"group": group, "label": label, "short": short or label, "ours": ours, "theirs": theirs,
                    "ratio": ratio, "target": target, "pass": ok, "unit": unit, "note": note})

    mu = res.get("multi")
    if mu:
        n, nl, size = mu["ranks"], mu["load_ranks"], mu["model_bytes"] / MiB
        s, ld = mu["save"], mu["load"]
        if "dcp" in s:
            add(GROUPS[0], f"{n}-rank save {size:.0f} MiB: time", _med(s["distckpt"]), _med(s["dcp"]), T["save_vs_dcp"],
                short=f"{n}-rank save time")
            add(GROUPS[0], f"{n}-rank save: peak RSS (max over ranks)", _med(s["distckpt"], "peak_rss_max"),
                _med(s["dcp"], "peak_rss_max"), T["rss_vs_dcp"], "B", short=f"{n}-rank save RSS")
            add(GROUPS[0], f"{n}-rank save: whole-process wall (mpirun vs torchrun)", _med(s["distckpt"], "wall_seconds"),
                _med(s["dcp"], "wall_seconds"), None, short=f"{n}-rank save wall")
        if "dcp" in ld:
            add(GROUPS[0], f"{nl}-rank column reshard-load: time", _med(ld["distckpt"]), _med(ld["dcp"]), T["load_vs_dcp"],
                short=f"{nl}-rank reshard time")
            add(GROUPS[0], f"{nl}-rank reshard-load: peak RSS (max over ranks)", _med(ld["distckpt"], "peak_rss_max"),
                _med(ld["dcp"], "peak_rss_max"), T["rss_vs_dcp"], "B", short=f"{nl}-rank reshard RSS")
            add(GROUPS[0], f"{nl}-rank reshard-load: whole-process wall", _med(ld["distckpt"], "wall_seconds"),
                _med(ld["dcp"], "wall_seconds"), None, short=f"{nl}-rank reshard wall")
        raw = _med(s["raw"])
        add(GROUPS[2], f"{n}-rank save / raw write+fsync (same bytes, one file per rank)", _med(s["distckpt"]), raw, T["vs_limit"],
            short=f"{n}-rank save / write")
        if "dcp" in s:
            add(GROUPS[2], f"DCP {n}-rank save / raw write+fsync", _med(s["dcp"]), raw, None, note="peer, for scale",
                short=f"DCP {n}-rank save / write")
        cat = _med(mu["cat_before_load"])
        add(GROUPS[2], f"{nl}-rank reshard-load / page-cache read (cat)", _med(ld["distckpt"]), cat, T["vs_limit"],
            short=f"{nl}-rank reshard / cat")
        if "dcp" in ld:
            add(GROUPS[2], f"DCP {nl}-rank reshard-load / page-cache read", _med(ld["dcp"]), cat, None, note="peer, for scale",
                short=f"DCP {nl}-rank reshard / cat")
    ce = res.get("cell")
    if ce:
        s, ld, size = ce["save"], ce["load"], ce["model_bytes"] / MiB
        if "mindformers" in s:
            add(GROUPS[1], f"1-process save {size:.0f} MiB Cell (vs save_checkpoint + os.sync)", _med(s["distckpt"]),
                _med(s["mindformers"]), T["cell_save_vs_mf"], short="1-proc save")
        if "mindformers" in ld:
            add(GROUPS[1], "1-process full load, checksums verified", _med(ld["distckpt"]), _med(ld["mindformers"]),
                T["cell_load_vs_mf"], short="1-proc load, verified")
            add(GROUPS[1], "1-process full load, verify=False", _med(ld["distckpt_noverify"]), _med(ld["mindformers"]),
                T["cell_load_noverify_vs_mf"], short="1-proc load, verify=False")
        add(GROUPS[2], "1-process save / raw write+fsync (one file)", _med(s["distckpt"]), _med(s["raw"]), T["vs_limit"],
            short="1-proc save / write")
        cat = _med(ce["cat_before_load"])
        add(GROUPS[2], "1-process load (verified) / page-cache read", _med(ld["distckpt"]), cat, T["vs_limit"],
            short="1-proc load / cat")
        add(GROUPS[2], "1-process load (verify=False) / page-cache read", _med(ld["distckpt_noverify"]), cat, T["vs_limit"],
            short="1-proc load nv / cat")
        mc = (res.get("memcpy") or {}).get(str(ce["model_bytes"]))
        add(GROUPS[2], "1-process load (verify=False) / memcpy", _med(ld["distckpt_noverify"]), mc, None, note="floor",
            short="1-proc load nv / memcpy")
    s3 = res.get("s3")
    if s3:
        for tag, vs in s3["layouts"].items():
            for v, r in vs.items():
                if "error" in r:
                    continue
                target = T["cooperative"] if v in ("default", "cooperative=True") else None
                add(GROUPS[3], f"{s3['ranks']} ranks load as {tag} ({v}): bytes served / needed once", r["served_bytes"],
                    r["needed_once"], target, "B", short=f"{tag} {v}")
    bal = (mu or {}).get("balance", {})
    for tag, b in bal.items():
        if b.get("max_over_mean") is not None:
            out.append({"group": GROUPS[4], "label": f"max / mean bytes written per rank: {tag}", "ours": None, "theirs": None,
                        "ratio": b["max_over_mean"], "target": T["balance"], "pass": b["max_over_mean"] <= T["balance"],
                        "short": tag.split(" (")[0],
                        "unit": "", "note": ""})
    asy = res.get("async")
    if asy and asy.get("steps_during_save"):
        mib = asy["bytes"] / MiB
        add(GROUPS[5], f"training step during a background save of {mib:.0f} MiB / without (median step)",
            statistics.median(asy["steps_during_save"]), statistics.median(asy["base_steps"]), T["async_step"],
            short="step during save")
        add(GROUPS[5], "blocked time of save() / copy of the same arrays into touched buffers",
            statistics.median(asy["blocked"]), min(asy["copy_seconds"]), T["async_blocked"], short="blocked / copy")
    return out


def _fmt(v, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "B":
        return f"{v / MiB:,.0f} MiB" if v < 10 * GiB else f"{v / GiB:,.1f} GiB"
    if unit == "s":
        return f"{v:.3f} s"
    return f"{v:.3g}"


def _runs_table(L: list, title: str, runs: dict, model_bytes: int, multi: bool) -> None:
    L.append(f"\n### {title}\n")
    if multi:
        L.append("| tool | runs (s, first enter → last leave) | median s | model GiB/s | median wall s | peak RSS max / sum over ranks (MiB) | RSS growth max (MiB) | values |")
        L.append("|---|---|---:|---:|---:|---:|---:|---|")
    else:
        L.append("| tool | runs (s, the call) | median s | model GiB/s | median wall s | peak RSS (MiB) | values |")
        L.append("|---|---|---:|---:|---:|---:|---|")
    for tool, rs in runs.items():
        med = _med(rs)
        gbs = model_bytes / med / GiB if med else float("nan")
        vals = "—" if not rs or "values_ok" not in rs[0] else ("exact" if all(r["values_ok"] for r in rs) else "**WRONG**")
        secs = ", ".join(f"{r['seconds']:.3f}" for r in rs)
        if multi:
            L.append(f"| {tool} | {secs} | {med:.3f} | {gbs:.2f} | {_med(rs, 'wall_seconds'):.2f} | "
                     f"{_med(rs, 'peak_rss_max') / MiB:,.0f} / {_med(rs, 'peak_rss_sum') / MiB:,.0f} | "
                     f"{_med(rs, 'growth_max') / MiB:,.0f} | {vals} |")
        else:
            L.append(f"| {tool} | {secs} | {med:.3f} | {gbs:.2f} | {_med(rs, 'wall_seconds'):.2f} | "
                     f"{_med(rs, 'peak_rss') / MiB:,.0f} | {vals} |")


def ratio_table(res: dict) -> list[str]:
    L = ["| | comparison | distckpt | other | ratio | target | result |", "|---|---|---:|---:|---:|---:|---|"]
    for r in res["ratios"]:
        mark = {True: "PASS", False: "**MISS**", None: "—"}[r["pass"]]
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        tgt = "—" if r["target"] is None else f"≤ {r['target']:g}"
        note = f" ({r['note']})" if r["note"] else ""
        L.append(f"| {r['group']} | {r['label']}{note} | {_fmt(r['ours'], r['unit'])} | {_fmt(r['theirs'], r['unit'])} | "
                 f"{ratio} | {tgt} | {mark} |")
    return L


def readme_block(res: dict) -> str:
    """The ratio table with its context line, for bench/README.md between the ``latest`` markers."""
    m = res["machine"]
    head = (f"Run {res['started']} (`{res['command'].strip()}`, {res['total_seconds'] / 60:.0f} min), {m['cores']} cores, "
            f"load average {m['loadavg'][0]:.1f} at the start and {res['loadavg_end'][0]:.1f} at the end; "
            f"{res['config']['reps']} alternated repetitions, medians. Every run: `results/latest.md`.\n")
    return "\n".join([head, *ratio_table(res)]) + "\n"


def update_readme(readme: str, res: dict) -> bool:
    """Replace the text between ``<!-- latest:begin -->`` and ``<!-- latest:end -->``; False if no markers."""
    begin, end = "<!-- latest:begin -->", "<!-- latest:end -->"
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        return False
    with open(readme, "w", encoding="utf-8") as f:
        f.write(text[: i + len(begin)] + "\n" + readme_block(res) + text[j:])
    return True


def render(res: dict) -> str:
    m = res["machine"]
    L: list[str] = [f"# distckpt vs its peers — {res['started']}\n", f"`{res['command'].strip()}` — {res['total_seconds'] / 60:.1f} min\n"]
    disk = m["disk"]
    L.append(
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['mem_total'] / GiB:.0f} GiB RAM, disk {disk['device']} ({disk['fstype']}) "
        f"at `{disk['workdir']}`; load average {m['loadavg'][0]:.2f} at start, {res['loadavg_end'][0]:.2f} at the end "
        f"(shared machine: compare ratios within this run). Python {m['python']}, numpy {m['numpy']}, "
        f"torch {res['versions'].get('torch')}, mindspore {res['versions'].get('mindspore')}, "
        f"mindformers {res['versions'].get('mindformers')}. {res['config']['reps']} alternated repetitions per row; "
        "medians compared. Page cache warm (every input was just written).\n"
    )
    for k, why in res["peers"].get("skipped", {}).items():
        L.append(f"- **{k}: skipped** — {why}")
    for k, why in res["peers"].get("failed", {}).items():
        L.append(f"- **{k}: FAILED** — last lines of its log:\n\n```\n{why}\n```")
    L.append("\n## Ratios (distckpt / peer or limit; ≤ target passes)\n")
    L += ratio_table(res)
    p = res["peers"]
    mu = p.get("multi")
    if mu:
        _runs_table(L, f"Row 1: {mu['ranks']} ranks save {mu['model_bytes'] / MiB:.0f} MiB fp32, row shards "
                       f"({mu['tensors']} tensors; distckpt under mpirun, DCP under torchrun + gloo)", mu["save"], mu["model_bytes"], True)
        cats = ", ".join(f"{c['seconds']:.3f}" for c in mu["cat_after_save"]["distckpt"])
        L.append(f"\nPage-cache read of the distckpt checkpoint right after each save (cat, s): {cats}")
        _runs_table(L, f"Row 2: {mu['load_ranks']} ranks load it as column shards (reshard), every page touched",
                    mu["load"], mu["model_bytes"], True)
        cats = ", ".join(f"{c['seconds']:.3f}" for c in mu["cat_before_load"])
        L.append(f"\nPage-cache read of the same files, once per repetition (cat, s): {cats}")
    ce = p.get("cell")
    if ce:
        _runs_table(L, f"Row 3: one process saves a {ce['model_bytes'] / MiB:.0f} MiB MindSpore Cell ({ce['tensors']} parameters)",
                    ce["save"], ce["model_bytes"], False)
        _runs_table(L, "Row 4: one process loads it, every page touched", ce["load"], ce["model_bytes"], False)
        cats = ", ".join(f"{c['seconds']:.3f}" for c in ce["cat_before_load"])
        L.append(f"\nPage-cache read of the distckpt files (cat, s): {cats}")
    s3 = p.get("s3")
    if s3:
        L.append(f"\n### Row 5: {s3['ranks']} ranks load {s3['model_bytes'] / MiB:.0f} MiB from S3 (moto on 127.0.0.1, GET bodies counted)\n")
        L.append(f"`distckpt.load` accepts `cooperative=`: {s3['load_accepts_cooperative']}.\n")
        L.append("| layout | load call | bytes served (MiB) | GETs | served / needed once | seconds | peak RSS max (MiB) |")
        L.append("|---|---|---:|---:|---:|---:|---:|")
        for tag, vs in s3["layouts"].items():
            for v, r in vs.items():
                if "error" in r:
                    L.append(f"| {tag} | {v} | **failed**: {r['error'].splitlines()[-1][:150]} | | | | |")
                    continue
                L.append(f"| {tag} | {v} | {r['served_bytes'] / MiB:,.1f} | {r['gets']} | {r['ratio']:.3f} | {r['seconds']:.2f} | "
                         f"{r['peak_rss_max'] / MiB:,.0f} |")
    if p.get("memcpy"):
        L.append("\n### Limits\n")
        L.append("| memcpy (numpy copyto, best of N) | seconds | GiB/s |")
        L.append("|---|---:|---:|")
        for size, sec in p["memcpy"].items():
            L.append(f"| {int(size) / MiB:,.0f} MiB | {sec:.4f} | {int(size) / sec / GiB:.2f} |")
    asy = p.get("async")
    if asy and asy.get("steps_during_save"):
        L.append(f"\n### Row 8: training steps during asynchronous saves of {asy['bytes'] / MiB:.0f} MiB "
                 "(one process; the step: numpy matmuls on one core)\n")
        L.append("| | n | median s | min s | max s |")
        L.append("|---|---:|---:|---:|---:|")
        for label, xs in (("step, no save in flight", asy["base_steps"]), ("step during a background save", asy["steps_during_save"]),
                          ("save() blocked", asy["blocked"]), ("copy into touched buffers", asy["copy_seconds"])):
            L.append(f"| {label} | {len(xs)} | {statistics.median(xs):.4f} | {min(xs):.4f} | {max(xs):.4f} |")
    if mu and mu.get("balance"):
        L.append("\n### Row 7: bytes written per rank\n")
        L.append("| layout | MiB per rank | max / mean |")
        L.append("|---|---|---:|")
        for tag, b in mu["balance"].items():
            per = ", ".join(f"{x / MiB:.0f}" for x in b["per_rank"])
            L.append(f"| {tag} | {per} | {b['max_over_mean']:.2f} |")
    return "\n".join(L) + "\n"


def plot(res: dict, png: str) -> str | None:
    """Bar chart of the ratios, one panel per peer / limit; dashed line at 1.0, ticks at each bar's target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return "matplotlib not installed"
    rows = [r for r in res["ratios"] if r["ratio"] is not None]
    groups = [g for g in GROUPS if any(r["group"] == g for r in rows)]
    if not groups:
        return "nothing to plot"
    fig, axes = plt.subplots(1, len(groups), figsize=(3.4 * len(groups), 5.0), squeeze=False)
    for ax, g in zip(axes[0], groups):
        rs = [r for r in rows if r["group"] == g]
        xs = list(range(len(rs)))
        colors = ["#2a9d8f" if r["pass"] else ("#e76f51" if r["pass"] is False else "#999999") for r in rs]
        # bars grow from 1.0 (up: distckpt slower / larger; down: faster / smaller) on a log axis
        ax.bar(xs, [r["ratio"] - 1.0 for r in rs], bottom=1.0, color=colors)
        lo = min([1.0] + [r["ratio"] for r in rs])
        hi = max([1.0] + [r["ratio"] for r in rs] + [r["target"] for r in rs if r["target"] is not None])
        ax.set_ylim(lo / 1.4, hi * 1.4)
        for x, r in zip(xs, rs):
            ax.text(x, r["ratio"], f"{r['ratio']:.2f}", ha="center", va="bottom", fontsize=8)
            if r["target"] is not None and r["target"] != 1.0:
                ax.hlines(r["target"], x - 0.4, x + 0.4, colors="black", linestyles="dotted")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        fmt = ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xticks(xs)
        ax.set_xticklabels([r["short"] for r in rs], rotation=40, ha="right", fontsize=7)
        ax.set_title(g, fontsize=10)
        ax.set_ylabel("distckpt / other (lower is better)" if ax is axes[0][0] else "")
    fig.suptitle(f"distckpt / peer, log scale — {res['started']} — green: target met, red: missed, grey: no target; "
                 "dashed: 1.0, dotted: the bar's own target", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return None
