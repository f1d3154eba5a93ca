"""The ``longattn`` command."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Attention over long contexts.")
console = Console()


def available_backends(spec, device: str) -> list[str]:
    """Backends of ``spec`` that can run on ``device`` at all (forward, fp32 or bf16)."""
    import torch

    from .api import validate_inputs

    names = []
    q = torch.zeros(1, 1, 1, 16, device=device)
    inputs = validate_inputs(q, q, q, causal=True, scale=None)
    config = spec.config_cls()
    for name, backend in spec.all_backends().items():
        if backend.can_serve(inputs, config) is None:
            names.append(name)
    return names


def _format_defaults(defaults: dict) -> str:
    return ", ".join(
        f"{k}={tuple(round(x, 4) for x in v) if isinstance(v, tuple) else v}" for k, v in defaults.items()
    ) or "-"


@app.command()
def methods() -> None:
    """List every method: family, backends available here, defaults and paper."""
    import torch

    from .registry import get_method, list_methods

    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = Table(title=f"longattn methods (backends available on {device})", show_lines=True)
    for col in ("method", "family", "backends", "defaults", "paper"):
        table.add_column(col, overflow="fold")
    for name in list_methods():
        spec = get_method(name)
        table.add_row(
            name,
            spec.family,
            ", ".join(available_backends(spec, device)),
            _format_defaults(spec.defaults()),
            spec.paper,
        )
    console.print(table)


@app.command()
def demo(
    seq_len: int = typer.Option(2048, help="sequence length T"),
    heads: int = typer.Option(8, help="query heads H"),
    kv_heads: int = typer.Option(2, help="key/value heads Hkv"),
    head_dim: int = typer.Option(64, help="head dim D"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda if present)"),
    dtype: str = typer.Option("float32", help="float32 or bfloat16"),
    seed: int = typer.Option(0),
) -> None:
    """Side-by-side table of every method on random inputs: error against full attention,
    achieved density and time."""
    from .demo import run_demo

    run_demo(
        seq_len=seq_len,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        device=device,
        dtype=dtype,
        seed=seed,
        console=console,
    )


def _parse_configs(items: list[str]) -> dict[str, dict]:
    """``["moba.top_k=3", "window.window=512"]`` -> ``{"moba": {"top_k": 3}, ...}``."""
    import ast

    out: dict[str, dict] = {}
    for item in items:
        head, sep, value = item.partition("=")
        method, dot, field = head.partition(".")
        if not sep or not dot or not method or not field:
            raise typer.BadParameter(f"--config {item!r} must look like method.field=value")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        out.setdefault(method, {})[field] = parsed
    return out


@app.command()
def arena(
    model: str = typer.Option("smollm2-135m", help="a known model name, a local directory or a hub id"),
    model_name: Optional[str] = typer.Option(
        None, help="name recorded in the store and report (default: --model); e.g. smollm2-135m "
                   "when --model is a path to its GGUF"),
    methods: Optional[str] = typer.Option(
        None, help="comma-separated attention methods (default: full,window,sink,bigbird,topk,moba,nsa; "
                   "only full when --policies is given)"),
    policies: str = typer.Option(
        "", help="comma-separated KV-cache policies (streaming,h2o,quest,recycled,duo,lighttransfer,full), "
                 "each run at every --budgets value with attention method full"),
    budgets: str = typer.Option(
        "10%,25%,50%", help="KV budgets for --policies: percentages of the prompt (25%), fractions (0.25) "
                            "or token counts (512, 2k); see longattn.arena.budget"),
    tasks: str = typer.Option("passkey,niah", help="comma-separated tasks"),
    lengths: str = typer.Option("1k,2k,4k,8k", help="comma-separated context lengths in tokens (2k = 2048)"),
    samples: int = typer.Option(5, help="samples per method x task x length (depth tasks sweep 5 depths)"),
    seed: int = typer.Option(0),
    store: str = typer.Option("arena.sqlite", help="SQLite file; a rerun resumes it"),
    config: list[str] = typer.Option([], help="method.field=value or policy.field=value, repeatable (e.g. "
                                                   "moba.top_k=3, quest.dense_layers=0, duo.retrieval_heads=heads.json)"),
    configs: str = typer.Option("paper", help="'paper': paper defaults; 'scaled': budgets of about T/8 per length"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda if present)"),
    dtype: str = typer.Option("float32", help="float32 or bfloat16"),
    fidelity: bool = typer.Option(True, help="per-layer error, mass recall and density"),
    timing: bool = typer.Option(True, help="prefill and decode times, peak memory"),
) -> None:
    """Measure methods side by side against full attention inside a model; results go to
    the SQLite store as each cell finishes, and a rerun resumes."""
    import torch

    from . import get_method, models as model_zoo
    from .arena.budget import BUDGET_POLICIES, check_policy_config, parse_budget, policy_config
    from .arena.job import ArenaJob, parse_length
    from .arena.report import markdown_table, policy_table, summarize, summarize_policies
    from .arena.runner import run_grid
    from .arena.store import Cell, ResultStore
    from .arena.tasks import TASKS
    from .demo import demo_configs

    policy_list = [p.strip() for p in policies.split(",") if p.strip()]
    for p in policy_list:
        if p not in BUDGET_POLICIES:
            raise typer.BadParameter(f"unknown KV policy {p!r}; choose from {list(BUDGET_POLICIES)}")
    try:
        budget_list = [parse_budget(b) for b in budgets.split(",") if b.strip()]
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    if any(p != "full" for p in policy_list) and not budget_list:
        raise typer.BadParameter("--policies needs at least one --budgets value")
    if methods is None:
        methods = "full" if policy_list else "full,window,sink,bigbird,topk,moba,nsa"
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    for m in method_list:
        get_method(m)
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    for t in task_list:
        if t not in TASKS:
            raise typer.BadParameter(f"unknown task {t!r}; choose from {sorted(TASKS)}")
    length_list = [parse_length(x) for x in lengths.split(",") if x.strip()]
    if configs not in ("paper", "scaled"):
        raise typer.BadParameter("--configs must be 'paper' or 'scaled'")
    overrides = _parse_configs(config)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    cells = []
    for length in length_list:
        base = demo_configs(length) if configs == "scaled" else {}
        for m in method_list:
            cfg = {**base.get(m, {}), **overrides.get(m, {})}
            get_method(m).make_config(**cfg)
            for t in task_list:
                for s in range(samples):
                    cells.append(Cell(model_name or model, m, t, length, s, seed, cfg))
        for p in policy_list:
            for b in [None] if p == "full" else budget_list:
                try:
                    pcfg = policy_config(p, b, length, {} if p == "full" else overrides.get(p, {}))
                    check_policy_config(p, pcfg)
                except ValueError as err:
                    raise typer.BadParameter(f"{p} at length {length}: {err}") from None
                label = None if b is None else b.label
                for t in task_list:
                    for s in range(samples):
                        cells.append(Cell(model_name or model, "full", t, length, s, seed, {}, p, label, pcfg))
    with ResultStore(store) as db:
        todo = len({c.key for c in cells} - db.done_keys())
        console.print(f"{len(cells)} cells, {len(cells) - todo} already in {store}, {todo} to run")
        if todo:
            lm, tok = model_zoo.load(model, dtype=dt, device=dev)
            job = ArenaJob(lm, tok, model_name=model_name or model, fidelity=fidelity, timing=timing)
            env = {"device": dev, "dtype": dtype, "torch": torch.__version__}
            if dev.startswith("cuda"):
                env["gpu"] = torch.cuda.get_device_name(dev)
            stats = run_grid(cells, job, db, env=env)
        keys = {c.key for c in cells}
        rows = [r for r in db.rows() if r["key"] in keys]
    if any(r["policy"] is None for r in rows):
        console.print(markdown_table(summarize(rows)))
    if any(r["policy"] is not None for r in rows):
        console.print(policy_table(summarize_policies(rows)))
    if todo and stats["failed"]:
        console.print(f"[red]{stats['failed']} cells failed (errors above); rerun to retry them[/red]")
        raise typer.Exit(1)


@app.command()
def report(
    store: str = typer.Option("arena.sqlite", help="the arena's SQLite file"),
    out: str = typer.Option("arena-report", help="folder for report.md, report.html and the PNGs"),
) -> None:
    """Render the arena store as markdown + a self-contained HTML page with plots."""
    from .arena.report import render

    paths = render(store, out)
    console.print(f"wrote {paths['report.md']} and {paths['report.html']} ({len(paths) - 2} plots)")


@app.command()
def data() -> None:
    """Fetch Jane Austen's novels (Debian r-cran-janeaustenr) for real-text haystacks."""
    from .arena.data import fetch_austen

    console.print(f"Austen's novels in {fetch_austen()}")


def _device(device: Optional[str]) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _length(text: str) -> int:
    from .arena.job import parse_length

    try:
        return parse_length(text)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--length") from None


def _parse_settings(items: list[str], cls) -> dict:
    """``["local_mass=0.8"]`` -> ``{"local_mass": 0.8}``, names checked against ``cls``'s fields."""
    import ast
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cls)}
    out: dict = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in fields:
            raise ValueError(f"--set {item!r} must be name=value with name one of {sorted(fields)}")
        try:
            out[name] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"--set {item!r}: {value!r} is not a number") from None
    return out


@app.command()
def analyze(
    model: str = typer.Option("smollm2-135m", help="a known model name, a local directory or a hub id"),
    length: str = typer.Option("2k", help="prompt length in tokens (2k = 2048; at least 16)"),
    out: str = typer.Option("analysis", help="output folder: report.md, analysis.json, PNGs"),
    task: str = typer.Option("niah", help="needle prompt: niah or passkey (ignored with --text)"),
    text: Optional[str] = typer.Option(None, help="analyse the first --length tokens of this text file instead"),
    haystack: Optional[str] = typer.Option(None, help="haystack kind: auto, austen, synthetic, repeat (default: the task's)"),
    depth: float = typer.Option(0.5, help="needle depth in [0, 1]"),
    seed: int = typer.Option(0),
    layers: Optional[str] = typer.Option(None, help="layers to picture, e.g. 0,5 (default: first, middle, last)"),
    heads: Optional[str] = typer.Option(None, help="query heads to picture, e.g. 0,3 (default: 0)"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda if present)"),
    dtype: str = typer.Option("float32", help="float32 or bfloat16 (statistics are computed in float32)"),
    window: int = typer.Option(64, help="recent window in tokens"),
    sink_tokens: int = typer.Option(4, help="initial tokens counted as sinks"),
    sink_factor: float = typer.Option(20.0, help="sink: mean received attention >= this x the uniform share"),
    chunk: int = typer.Option(256, help="query rows per softmax chunk"),
    max_pixels: int = typer.Option(512, help="attention maps are pooled to at most this many tiles a side"),
    set_: list[str] = typer.Option(
        [], "--set", help="any other AnalysisConfig field as name=value, repeatable (e.g. local_mass=0.8, "
                          "sink_min_share=0.05, retrieval_top_k=4)"),
) -> None:
    """Attention entropy, sinks, head classes, retrieval scores and attention maps of every
    layer and head on one prompt; writes markdown, JSON and PNGs to --out."""
    import torch

    from . import models as model_zoo
    from .analysis import AnalysisConfig
    from .analysis.analyze import (NEEDLE_TASKS, analyze_model, check_indices, model_shape, needle_prompt,
                                   parse_index_list, text_prompt, write_outputs)

    n_tokens = _length(length)
    if text is None and task not in NEEDLE_TASKS:
        raise typer.BadParameter(f"--task must be one of {NEEDLE_TASKS}", param_hint="--task")
    if dtype not in ("float32", "bfloat16"):
        raise typer.BadParameter("--dtype must be float32 or bfloat16", param_hint="--dtype")
    try:
        picture_layers = parse_index_list(layers, "--layers")
        picture_heads = parse_index_list(heads, "--heads")
        settings = dict(window=window, sink_tokens=sink_tokens, sink_factor=sink_factor, chunk=chunk)
        settings.update(_parse_settings(set_, AnalysisConfig))  # --set wins
        config = AnalysisConfig(**settings)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    dev = _device(device)
    lm, tok = model_zoo.load(model, dtype=getattr(torch, dtype), device=dev)
    try:
        n_layers, n_heads, _ = model_shape(lm)
        check_indices(picture_layers, picture_heads, n_layers, n_heads)
        prompt = (text_prompt(tok, text, n_tokens) if text else
                  needle_prompt(tok, n_tokens, task=task, seed=seed, depth=depth, haystack=haystack))
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    console.print(f"analysing {model} on {prompt.ids.shape[1]} tokens ({dev})")
    result = analyze_model(lm, tok, prompt, model_name=model, config=config, picture_layers=picture_layers,
                           picture_heads=picture_heads, max_pixels=max_pixels)
    paths = write_outputs(result, out)
    if result.answer is not None:
        console.print(f"answer {prompt.source['answer']!r}, model replied {result.answer['reply'].strip()!r}")
    console.print(f"wrote {paths['report.md']}, {paths['analysis.json']} and {len(result.pictures)} PNGs")


@app.command()
def calibrate(
    model: str = typer.Option("smollm2-135m", help="a known model name, a local directory or a hub id"),
    method: str = typer.Option(..., help="duo, lighttransfer or headkv"),
    out: str = typer.Option(..., help="calibration JSON file to write"),
    length: Optional[str] = typer.Option(None, help="prompt length (default: 512 for duo, 1k otherwise)"),
    steps: int = typer.Option(40, help="duo: optimisation steps"),
    ratio: Optional[float] = typer.Option(
        None, help="fraction marked: duo retrieval KV heads (default 0.5), lighttransfer lazy layers "
                   "(0.5), headkv retrieval heads (0.05)"),
    samples: Optional[int] = typer.Option(None, help="needle samples (default: 4 for duo and headkv, 2 for lighttransfer)"),
    seed: int = typer.Option(0),
    lr: float = typer.Option(0.02, help="duo: Adam learning rate (the paper's 0.02)"),
    lam: float = typer.Option(0.05, help="duo: weight of the L1 penalty on the gates"),
    sink: int = typer.Option(4, help="duo/lighttransfer: initial sink tokens of streaming attention"),
    window: int = typer.Option(64, help="duo/lighttransfer: recent window of streaming attention"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda if present)"),
) -> None:
    """Calibrate a model and write a versioned calibration file: DuoAttention gates (duo),
    LightTransfer lazy layers (lighttransfer) or retrieval-head scores (headkv)."""
    from . import models as model_zoo
    from .analysis.calibrate import (METHODS, calibrate_duo, calibrate_headkv, calibrate_lighttransfer,
                                     check_ratio, save_calibration)

    if method not in METHODS:
        raise typer.BadParameter(f"--method must be one of {METHODS}", param_hint="--method")
    n_tokens = _length(length or ("512" if method == "duo" else "1k"))
    r = ratio if ratio is not None else {"duo": 0.5, "lighttransfer": 0.5, "headkv": 0.05}[method]
    try:
        check_ratio(r)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--ratio") from None
    n_samples = samples if samples is not None else (2 if method == "lighttransfer" else 4)
    if n_samples < 1 or steps < 1 or sink < 1 or window < 1:
        raise typer.BadParameter("--samples, --steps, --sink and --window must be at least 1")
    dev = _device(device)
    lm, tok = model_zoo.load(model, device=dev)
    console.print(f"calibrating {model} with {method} on {n_samples} samples of {n_tokens} tokens ({dev})")
    common = dict(model_name=model, length=n_tokens, samples=n_samples, ratio=r, seed=seed)
    if method == "duo":
        cal = calibrate_duo(lm, tok, steps=steps, lr=lr, lam=lam, sink=sink, window=window, **common)
        loss = cal.data["loss"]
        console.print(f"loss {loss[0]['loss']:.4g} -> {loss[-1]['loss']:.4g} over {len(loss)} steps")
    elif method == "lighttransfer":
        cal = calibrate_lighttransfer(lm, tok, window=window, sink=sink, **common)
    else:
        cal = calibrate_headkv(lm, tok, **common)
    data = cal.data
    if method == "duo":
        kept = [f"L{l}kv{h}" for l, row in enumerate(data["retrieval"]) for h, f in enumerate(row) if f]
        console.print(f"retrieval (full-attention) KV heads: {len(kept)} of {data['num_layers'] * data['num_kv_heads']}")
    elif method == "lighttransfer":
        lazy = [i for i, f in enumerate(data["lazy"]) if f]
        console.print(f"lazy layers ({len(lazy)} of {data['num_layers']}): {lazy}")
    else:
        top = ", ".join(f"L{l}H{h}={data['scores'][l][h]:.2f}" for l, h in data["rank"][:10])
        console.print(f"top retrieval heads: {top} ({data['settings']['correct']}/{n_samples} answered correctly)")
    path = save_calibration(cal, out)
    console.print(f"wrote {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
