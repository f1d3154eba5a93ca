"""Render an arena store as markdown + one self-contained HTML page with PNG plots.

Metrics read from each row (missing ones are left blank): ``score`` (task accuracy, 0..1),
``density``, ``kl`` (last-position logit KL against full attention), ``prefill_ms``,
``decode_ms_per_token``, ``peak_bytes``, ``layer_rel_error`` and ``layer_mass_recall``
(lists, one value per layer), and ``depth`` (needle depth) for depth-swept tasks.

Rows of KV-cache policy cells (``policy`` set; see :mod:`longattn.arena.budget`) get their own
table, one line per policy x budget x task x length (:func:`summarize_policies`: accuracy, KV
bytes held / full, bytes read / full, logit KL at the first decoding step, decode ms/token,
peak memory), and one PNG per task, ``accuracy_vs_kv_memory_<task>.png``: accuracy against
the KV bytes held as a fraction of a full cache, one line per policy, full attention at 1.
Per-layer fidelity is not reported for policy cells (the attention probe does not see the
attention a KV cache computes). The method table and plots cover method rows only, as before.
"""

from __future__ import annotations

import base64
import html
import io
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from .budget import is_uncalibrated, parse_budget
from .store import ResultStore, canonical_json

SUMMARY_COLUMNS = (
    ("method", "method"),
    ("config", "config"),
    ("task", "task"),
    ("length", "length"),
    ("n", "samples"),
    ("accuracy", "accuracy"),
    ("density", "density"),
    ("rel_error", "mean layer rel. error"),
    ("mass_recall", "mean layer mass recall"),
    ("kl", "logit KL"),
    ("prefill_ms", "prefill ms"),
    ("speedup", "prefill speed-up vs full"),
    ("decode_ms_per_token", "decode ms/token"),
    ("peak_gib", "peak GiB"),
)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(values) if values else None


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def method_label(row: dict[str, Any]) -> str:
    config = row["config"]
    return row["method"] if not config else f"{row['method']}({', '.join(f'{k}={v}' for k, v in sorted(config.items()))})"


def summarize(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (method, config, task, length) of the method rows (rows with a KV policy
    are left to :func:`summarize_policies`): means of the per-sample metrics, the prefill
    speed-up against ``full`` on the same task and length, and peak memory."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("policy") is not None:
            continue
        groups[(row["method"], canonical_json(row["config"]), row["task"], row["length"])].append(row)
    out = []
    for (method, config, task, length), members in sorted(groups.items()):
        m = [r["metrics"] for r in members]
        line = {
            "method": method,
            "config": config if config != "{}" else "",
            "label": method_label(members[0]),
            "task": task,
            "length": length,
            "n": len(members),
            "accuracy": _mean([x.get("score") for x in m]),
            "density": _mean([x.get("density") for x in m]),
            "rel_error": _mean([_mean(x["layer_rel_error"]) for x in m if x.get("layer_rel_error")]),
            "mass_recall": _mean([_mean(x["layer_mass_recall"]) for x in m if x.get("layer_mass_recall")]),
            "kl": _mean([x.get("kl") for x in m]),
            "prefill_ms": _median([x.get("prefill_ms") for x in m]),
            "decode_ms_per_token": _median([x.get("decode_ms_per_token") for x in m]),
            "peak_gib": (lambda p: None if p is None else p / 2**30)(_median([x.get("peak_bytes") for x in m])),
        }
        out.append(line)
    full = {(l["task"], l["length"]): l["prefill_ms"] for l in out if l["method"] == "full"}
    for line in out:
        base = full.get((line["task"], line["length"]))
        line["speedup"] = base / line["prefill_ms"] if base and line["prefill_ms"] else None
    return out


POLICY_COLUMNS = (
    ("policy", "policy"),
    ("budget", "budget"),
    ("config", "policy config"),
    ("task", "task"),
    ("length", "length"),
    ("n", "samples"),
    ("accuracy", "accuracy"),
    ("kv_ratio", "KV memory / full"),
    ("read_ratio", "bytes read / full"),
    ("kl", "logit KL (1st decode step)"),
    ("decode_ms_per_token", "decode ms/token"),
    ("peak_gib", "peak GiB"),
)

POLICY_NOTE = (
    "KV-cache policies run with full attention and the policy's cache (`longattn.kv.make_cache`); "
    "the budget is a share of the prompt or a token count, translated per policy by "
    "`longattn.arena.budget.policy_config`. KV memory / full: bytes the cache holds after the last "
    "generated token over a full cache of the same tokens; bytes read / full: key/value bytes read by "
    "the decoding steps over full attention's. Per-layer fidelity is not measured for policy cells: "
    "the cache computes the attention itself and the attention probe does not see those calls. "
    "Quest and Recycled Attention keep the whole cache (KV memory 1, x = 1 in the plot): what they save "
    "is bytes read. "
    "Policies marked *uncalibrated* chose DuoAttention heads / LightTransfer layers by a fixed rule, "
    "not from a calibration file."
)


def _budget_order(budget: str | None) -> tuple:
    if budget is None:
        return (2, 0.0)
    b = parse_budget(budget)
    return (0, b.fraction) if b.fraction is not None else (1, float(b.tokens))


def policy_label(policy: str, config: dict[str, Any]) -> str:
    """The policy's name, marked when its heads/layers were chosen without calibration."""
    return f"{policy} (uncalibrated)" if is_uncalibrated(policy, config) else policy


def summarize_policies(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (policy, budget, policy config, task, length) of the KV-policy rows:
    mean accuracy, mean KV memory ratio, mean bytes-read ratio, mean first-decode-step logit
    KL, median decode ms/token and median peak memory (GiB)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("policy") is None:
            continue
        groups[(row["policy"], row["budget"], canonical_json(row["policy_config"]), row["task"], row["length"])].append(row)
    out = []
    for (policy, budget, config, task, length), members in groups.items():
        m = [r["metrics"] for r in members]
        out.append({
            "policy": policy_label(policy, members[0]["policy_config"]),
            "name": policy,
            "budget": budget,
            "config": config if config != "{}" else "",
            "task": task,
            "length": length,
            "n": len(members),
            "accuracy": _mean([x.get("score") for x in m]),
            "kv_ratio": _mean([x.get("kv_ratio") for x in m]),
            "read_ratio": _mean([x.get("read_ratio") for x in m]),
            "kl": _mean([x.get("kl") for x in m]),
            "decode_ms_per_token": _median([x.get("decode_ms_per_token") for x in m]),
            "peak_gib": (lambda p: None if p is None else p / 2**30)(_median([x.get("peak_bytes") for x in m])),
        })
    out.sort(key=lambda l: (l["name"], l["task"], l["length"], _budget_order(l["budget"]), l["config"]))
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(summary: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(title for _, title in SUMMARY_COLUMNS) + " |"
    rule = "|" + "---|" * len(SUMMARY_COLUMNS)
    lines = [head, rule]
    for line in summary:
        lines.append("| " + " | ".join(_fmt(line[key]) for key, _ in SUMMARY_COLUMNS) + " |")
    return "\n".join(lines)


def policy_table(summary: list[dict[str, Any]]) -> str:
    """The :func:`summarize_policies` lines as a markdown table."""
    head = "| " + " | ".join(title for _, title in POLICY_COLUMNS) + " |"
    rule = "|" + "---|" * len(POLICY_COLUMNS)
    lines = [head, rule]
    for line in summary:
        lines.append("| " + " | ".join(_fmt(line[key]) for key, _ in POLICY_COLUMNS) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- plots
def _save_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _policy_figures(policy_summary: list[dict[str, Any]], summary: list[dict[str, Any]]) -> dict[str, bytes]:
    """``accuracy_vs_kv_memory_<task>.png`` per task: one panel per length; x the KV bytes held
    over a full cache, y accuracy; one line per policy through its budgets; full attention
    (the method ``full`` rows, else the ``full`` policy rows) as a star at x = 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, bytes] = {}
    for task in sorted({l["task"] for l in policy_summary}):
        mine = [l for l in policy_summary if l["task"] == task]
        lengths = sorted({l["length"] for l in mine})
        fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 3.8), squeeze=False)
        for ax, length in zip(axes[0], lengths):
            at = [l for l in mine if l["length"] == length]
            for label in sorted({l["policy"] for l in at if l["name"] != "full"}):
                pts = sorted((l["kv_ratio"], l["accuracy"]) for l in at
                             if l["policy"] == label and l["kv_ratio"] is not None and l["accuracy"] is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            full = [l["accuracy"] for l in summary
                    if l["method"] == "full" and not l["config"] and l["task"] == task and l["length"] == length]
            full = full or [l["accuracy"] for l in at if l["name"] == "full"]
            full_acc = _mean(full)
            if full_acc is not None:
                ax.scatter([1.0], [full_acc], marker="*", s=160, color="black", zorder=5, label="full attention")
            ax.set_xlim(0, 1.05)
            ax.set_ylim(-0.05, 1.05)
            ax.set_xlabel("KV bytes held / full cache")
            ax.set_ylabel("accuracy")
            ax.set_title(f"{task}, T = {length}: accuracy vs KV memory")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="lower right")
        figs[f"accuracy_vs_kv_memory_{task}.png"] = _save_png(fig)
    return figs


def _figures(rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> dict[str, bytes]:
    """The method plots (accuracy by length, by depth, fidelity per layer, Pareto) of the
    method rows; nothing when there are none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, bytes] = {}
    rows = [r for r in rows if r.get("policy") is None]
    if not summary:
        return figs

    def save(name: str, fig) -> None:
        figs[name] = _save_png(fig)

    tasks = sorted({l["task"] for l in summary})
    # accuracy by length, one panel per task
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for label in sorted({l["label"] for l in summary if l["task"] == task}):
            pts = sorted((l["length"], l["accuracy"]) for l in summary if l["task"] == task and l["label"] == label and l["accuracy"] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{task}: accuracy by length")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylim(-0.05, 1.05)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    save("accuracy_by_length.png", fig)

    # depth x length heatmaps per method, for rows that carry a needle depth
    depth_rows = [r for r in rows if r["metrics"].get("depth") is not None and r["metrics"].get("score") is not None]
    if depth_rows:
        labels = sorted({method_label(r) for r in depth_rows})
        lengths = sorted({r["length"] for r in depth_rows})
        depths = sorted({round(r["metrics"]["depth"], 3) for r in depth_rows})
        fig, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels), 3.2), squeeze=False)
        for ax, label in zip(axes[0], labels):
            grid = [[_mean([r["metrics"]["score"] for r in depth_rows if method_label(r) == label and r["length"] == L and round(r["metrics"]["depth"], 3) == d]) for L in lengths] for d in depths]
            img = [[float("nan") if v is None else v for v in row] for row in grid]
            ax.imshow(img, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], rotation=45, fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
            ax.set_title(label, fontsize=8)
        axes[0][0].set_ylabel("needle depth")
        save("accuracy_by_depth.png", fig)

    # fidelity per layer
    layer_rows = [r for r in rows if r["metrics"].get("layer_rel_error")]
    if layer_rows:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        for label in sorted({method_label(r) for r in layer_rows}):
            mine = [r["metrics"] for r in layer_rows if method_label(r) == label]
            n = len(mine[0]["layer_rel_error"])
            axes[0].plot(range(n), [_mean([m["layer_rel_error"][i] for m in mine]) for i in range(n)], label=label)
            if mine[0].get("layer_mass_recall"):
                axes[1].plot(range(n), [_mean([m["layer_mass_recall"][i] for m in mine]) for i in range(n)], label=label)
        axes[0].set_title("attention-output relative error per layer")
        axes[1].set_title("attention-mass recall per layer")
        for ax in axes:
            ax.set_xlabel("layer")
        axes[0].legend(fontsize=7)
        save("fidelity_per_layer.png", fig)

    # Pareto views, one row per context length: accuracy vs prefill speed-up and vs peak memory
    # (pooled over tasks; each point one method)
    lengths = sorted({l["length"] for l in summary if l["accuracy"] is not None})
    if lengths:
        fig, axes = plt.subplots(len(lengths), 2, figsize=(11, 3.4 * len(lengths)), squeeze=False)
        for row, length in zip(axes, lengths):
            at = [l for l in summary if l["length"] == length and l["accuracy"] is not None]
            for label in sorted({l["label"] for l in at}):
                pts = [l for l in at if l["label"] == label]
                acc = _mean([p["accuracy"] for p in pts])
                sp = _mean([p["speedup"] for p in pts])
                mem = _mean([p["peak_gib"] for p in pts])
                if sp is not None:
                    row[0].scatter([sp], [acc], label=label)
                if mem is not None:
                    row[1].scatter([mem], [acc], label=label)
            row[0].set_xlabel("prefill speed-up vs full")
            row[1].set_xlabel("peak memory (GiB)")
            for ax in row:
                ax.set_ylabel("accuracy")
                ax.set_ylim(-0.05, 1.05)
                ax.set_title(f"T = {length}")
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
        save("pareto.png", fig)
    return figs


def render(store_path: str | Path, out_dir: str | Path, title: str = "longattn arena") -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` (PNG plots embedded) and the PNG files to
    ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with ResultStore(store_path) as store:
        rows = list(store.rows())
    if not rows:
        raise ValueError(f"the arena store {store_path} holds no results yet; run `longattn arena` first")
    summary = summarize(rows)
    policy_summary = summarize_policies(rows)
    figs = _figures(rows, summary)
    policy_figs = _policy_figures(policy_summary, summary)
    paths: dict[str, Path] = {}
    for name, data in {**figs, **policy_figs}.items():
        paths[name] = out_dir / name
        paths[name].write_bytes(data)
    md = [f"# {title}", "", f"{len(rows)} results from `{store_path}`.", ""]
    if summary:
        md += [markdown_table(summary), ""]
        md += [f"![{name}]({name})" for name in figs]
    if policy_summary:
        md += ["", "## KV-cache policies", "", POLICY_NOTE, "", policy_table(policy_summary), ""]
        md += [f"![{name}]({name})" for name in policy_figs]
    paths["report.md"] = out_dir / "report.md"
    paths["report.md"].write_text("\n".join(md) + "\n")

    def html_table(lines: list[dict[str, Any]], columns: tuple[tuple[str, str], ...]) -> str:
        head = "".join(f"<th>{html.escape(t)}</th>" for _, t in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(line[key]))}</td>" for key, _ in columns) + "</tr>"
            for line in lines
        )
        return f"<table><tr>{head}</tr>{body}</table>"

    def html_figures(images: dict[str, bytes]) -> str:
        return "".join(
            f'<figure><img alt="{n}" src="data:image/png;base64,{base64.b64encode(d).decode()}"><figcaption>{n}</figcaption></figure>'
            for n, d in images.items()
        )

    body = ""
    if summary:
        body += html_table(summary, SUMMARY_COLUMNS) + html_figures(figs)
    if policy_summary:
        note = html.escape(POLICY_NOTE).replace("*uncalibrated*", "<em>uncalibrated</em>")
        body += (f"<h2>KV-cache policies</h2><p>{note}</p>" + html_table(policy_summary, POLICY_COLUMNS)
                 + html_figures(policy_figs))
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{len(rows)} results.</p>{body}</body></html>"
    )
    paths["report.html"] = out_dir / "report.html"
    paths["report.html"].write_text(page)
    return paths
