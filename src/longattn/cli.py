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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
