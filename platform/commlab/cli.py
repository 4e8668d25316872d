"""`commlab` command line. Thin wiring only: every command calls an importable function."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    help="CoMM multimodal contrastive learning: pretrain, sweep, track and promote.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Generate, import and validate datasets.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
console = Console()
err_console = Console(stderr=True)


def _fail(msg: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {msg}")
    return typer.Exit(code=2)


@app.command()
def pretrain(
    config: Annotated[Path, typer.Argument(help="experiment YAML (see configs/)")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted key=value overrides")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="run directory (default: train.out_dir/name)")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="continue from the checkpoint in the run directory")
    ] = False,
) -> None:
    """Pretrain locally in this process; probes every train.probe_every epochs."""
    from commlab.config import ConfigError, load_config
    from commlab.train.local import pretrain_local

    try:
        cfg = load_config(config, overrides or [])
        pretrain_local(cfg, run_dir=out, resume=resume, console=console)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None


@config_app.command("show")
def config_show(
    config: Annotated[
        Path | None, typer.Argument(help="experiment YAML; defaults if omitted")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted key=value overrides")
    ] = None,
    flat: Annotated[bool, typer.Option(help="print dotted keys instead of YAML")] = False,
) -> None:
    """Print the resolved (validated, overridden) configuration."""
    from commlab.config import ConfigError, flatten, load_config, to_yaml

    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as err:
        raise _fail(str(err)) from None
    if flat:
        for k, v in flatten(cfg).items():
            console.print(f"{k}={v}", highlight=False, markup=False)
    else:
        console.print(to_yaml(cfg), highlight=False, markup=False)


@data_app.command("trifeatures")
def data_trifeatures(
    out: Annotated[Path, typer.Option(help="root directory for generated datasets")],
    size: Annotated[int, typer.Option(help="image side in pixels (>= 32)")] = 64,
    seed: Annotated[int, typer.Option(help="generation seed")] = 0,
    biased: Annotated[bool, typer.Option(help="print the biased (synergy) dataset path")] = False,
    pairs: Annotated[int, typer.Option(help="number of train pairs")] = 10_000,
    test_pairs: Annotated[int, typer.Option(help="number of test pairs")] = 4_000,
) -> None:
    """Render bimodal Trifeatures once (reused when present) in the Parquet dataset format."""
    from commlab.data.trifeatures import generate_trifeatures

    try:
        path = generate_trifeatures(out, size=size, seed=seed, pairs=pairs, test_pairs=test_pairs)
    except ValueError as err:
        raise _fail(str(err)) from None
    console.print(f"trifeatures ready: {path}")
    console.print(f"  pretrain on: {path / ('biased' if biased else 'unbiased')}")


@data_app.command("validate")
def data_validate(path: Annotated[Path, typer.Argument(help="dataset directory")]) -> None:
    """Check a dataset in the commlab Parquet format; exit 1 when problems are found."""
    from commlab.data.parquet import validate_dataset

    problems = validate_dataset(path)
    if problems:
        for p in problems:
            err_console.print(f"[red]✗[/] {p}")
        raise typer.Exit(code=1)
    console.print(f"[green]✓[/] {path} is a valid commlab dataset")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
