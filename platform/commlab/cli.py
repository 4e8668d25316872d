"""`commlab` command line. Thin wiring only: every command calls an importable function."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from commlab import jobs
from commlab.cluster import ClusterError
from commlab.config import ConfigError, ExperimentConfig, flatten, load_config, to_yaml

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
    """Print `msg` as one error (escaped: messages name keys as `[key]`, which rich would
    otherwise swallow as markup) and return the exit to raise (code 2: bad input)."""
    err_console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)
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
    workers: Annotated[
        int,
        typer.Option(
            min=0,
            help="0: train in this process (no Ray); N >= 1: Ray Train, N data-parallel workers",
        ),
    ] = 0,
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)"
        ),
    ] = None,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="GPUs per Ray worker")] = 0.0,
    cpus_per_worker: Annotated[float, typer.Option(min=0.01, help="CPUs per Ray worker")] = 1.0,
    max_failures: Annotated[
        int, typer.Option(min=-1, help="Ray worker-group restarts from the last checkpoint")
    ] = 1,
    experiment: Annotated[
        str | None, typer.Option(help="MLflow experiment (default: the config's name)")
    ] = None,
    tracking: Annotated[
        bool, typer.Option(help="log an MLflow run (--no-tracking: files in --out only)")
    ] = True,
    sync_bn: Annotated[
        bool,
        typer.Option(help="BatchNorm over the global batch (--no-sync-bn: per worker, faster)"),
    ] = True,
) -> None:
    """Pretrain; probes every train.probe_every epochs.

    --workers 0 (default): in this process; checkpoint.pt and metrics.jsonl in the run directory.

    --workers N: Ray Train, N data-parallel workers; restarts after worker failures.

    Every run logs one MLflow run (params, per-epoch metrics, checkpoint, R/U/S report) to
    $MLFLOW_TRACKING_URI (default sqlite:///<cwd>/mlflow.db); --resume continues it.
    """
    if workers == 0 and (address or gpus_per_worker):
        raise _fail("--address and --gpus-per-worker need --workers >= 1")
    # lazy: training imports torch, which `import commlab.cli` must not load
    from commlab.train.loop import NonFiniteLossError

    try:
        cfg = load_config(config, overrides or [])
        if workers == 0:
            _pretrain_here(cfg, out, resume=resume, tracking=tracking, experiment=experiment)
        else:
            _pretrain_with_ray(
                cfg, out, workers=workers, cpus_per_worker=cpus_per_worker,
                gpus_per_worker=gpus_per_worker, max_failures=max_failures, resume=resume,
                address=address, experiment=experiment, tracking=tracking, sync_bn=sync_bn,
            )  # fmt: skip
    except NonFiniteLossError as err:
        raise _failed("pretraining", err) from None
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, ClusterError) as err:
        raise _fail(str(err)) from None


def _pretrain_here(
    cfg: ExperimentConfig, out: Path | None, *, resume: bool, tracking: bool, experiment: str | None
) -> None:
    """`commlab pretrain --workers 0`: train in this process, no Ray."""
    # lazy: training imports torch, which `import commlab.cli` must not load
    from commlab.train.local import pretrain_local

    pretrain_local(
        cfg, run_dir=out, resume=resume, console=console, tracking=tracking, experiment=experiment
    )


def _pretrain_with_ray(
    cfg: ExperimentConfig,
    out: Path | None,
    *,
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    max_failures: int,
    resume: bool,
    address: str | None,
    experiment: str | None,
    tracking: bool,
    sync_bn: bool,
) -> None:
    """`commlab pretrain --workers N`: Ray Train; a run that fails for good exits 1."""
    # lazy: Ray Train and torch, which `import commlab.cli` must not load
    from commlab.train.trainer import PretrainFailedError, RayTrainSettings, pretrain_ray

    settings = RayTrainSettings(
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        max_failures=max_failures,
        storage_path=str(out.parent) if out else None,
        run_name=out.name if out else None,
        resume=resume,
        address=address,
        experiment=experiment,
        tracking=tracking,
        sync_batchnorm=sync_bn,
    )
    try:
        pretrain_ray(cfg, settings, console=console)
    except PretrainFailedError as err:
        raise _failed("pretraining", err) from None


def _failed(what: str, err: Exception) -> typer.Exit:
    """Print that `what` failed (a run that started and did not finish) and return the exit to
    raise (code 1)."""
    err_console.print(f"[bold red]{what} failed:[/] {err}")
    return typer.Exit(code=1)


@app.command()
def sweep(
    space: Annotated[Path, typer.Argument(help="search-space YAML (see search_spaces/README.md)")],
    name: Annotated[str | None, typer.Option(help="sweep name (default: the space's name)")] = None,
    resume: Annotated[
        bool, typer.Option(help="finish an interrupted sweep; finished trials are not re-run")
    ] = False,
    storage: Annotated[
        str | None,
        typer.Option(help="Tune/Train storage: a path or pyarrow URI (default ./sweeps)"),
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else embedded)")
    ] = None,
    check: Annotated[bool, typer.Option(help="validate the search space and exit")] = False,
) -> None:
    """Sweep CoMM pretraining with Ray Tune (Optuna TPE + ASHA); one MLflow parent run per
    sweep, one child run per trial, at $MLFLOW_TRACKING_URI (default sqlite:///<cwd>/mlflow.db)."""
    # lazy: search spaces import the methods (torch) and the sweep driver Ray Tune and MLflow,
    # which `import commlab.cli` must not load; `--check` needs only the first
    from commlab.sweep.space import SearchSpaceError, sweep_plan

    if check:
        try:
            plan = sweep_plan(space)
        except (SearchSpaceError, ValueError, FileNotFoundError) as err:
            raise _fail(str(err)) from None
        console.print(
            f"[green]✓[/] {space}: {plan.spec.num_samples} trials over "
            f"{', '.join(plan.spec.params) or 'no parameters'}; metric {plan.spec.metric} ({plan.spec.mode})"
        )
        return
    from commlab.sweep.run import SweepFailedError, run_sweep

    try:
        run_sweep(
            space, name=name, resume=resume, storage=storage, address=address, console=console
        )
    except (SearchSpaceError, ValueError, FileNotFoundError, ClusterError) as err:
        raise _fail(str(err)) from None
    except SweepFailedError as err:
        raise _failed("sweep", err) from None


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
    # lazy: each method registers the options its `loss:` section is checked against (torch)
    import commlab.models  # noqa: F401

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
    # lazy: commlab.data imports torch, which `import commlab.cli` must not load
    from commlab.data.trifeatures import generate_trifeatures

    try:
        path = generate_trifeatures(out, size=size, seed=seed, pairs=pairs, test_pairs=test_pairs)
    except ValueError as err:
        raise _fail(str(err)) from None
    console.print(f"trifeatures ready: {path}")
    console.print(f"  pretrain on: {path / ('biased' if biased else 'unbiased')}")


@data_app.command("synthetic")
def data_synthetic(
    out: Annotated[Path, typer.Option(help="root directory for generated datasets")],
    train: Annotated[int | None, typer.Option(help="train samples [10000]")] = None,
    test: Annotated[int | None, typer.Option(help="test samples [4000]")] = None,
    dim: Annotated[int | None, typer.Option(help="ambient dimension per modality [32]")] = None,
    share_dim: Annotated[int | None, typer.Option(help="redundant part's dimension")] = None,
    unique_dim: Annotated[int | None, typer.Option(help="unique part's dimension")] = None,
    synergy_dim: Annotated[int | None, typer.Option(help="synergy part's dimension")] = None,
    nuisance_dim: Annotated[int | None, typer.Option(help="pure-noise dimensions")] = None,
    share_classes: Annotated[int | None, typer.Option(help="classes of `share`")] = None,
    unique_classes: Annotated[int | None, typer.Option(help="classes of `unique1/2`")] = None,
    synergy_scale: Annotated[float | None, typer.Option(help="norm of the shared axis")] = None,
    noise: Annotated[float | None, typer.Option(help="Gaussian noise std")] = None,
    mix: Annotated[bool | None, typer.Option(help="random rotation of each modality")] = None,
    seed: Annotated[int, typer.Option(help="generation seed")] = 0,
) -> None:
    """Write the synthetic redundancy / uniqueness / synergy dataset (reused when present);
    unset knobs take the defaults in commlab.data.synthetic.DEFAULTS."""
    # lazy: commlab.data imports torch, which `import commlab.cli` must not load
    from commlab.data.synthetic import generate_with_summary

    knobs = dict(
        train=train,
        test=test,
        dim=dim,
        share_dim=share_dim,
        unique_dim=unique_dim,
        synergy_dim=synergy_dim,
        nuisance_dim=nuisance_dim,
        share_classes=share_classes,
        unique_classes=unique_classes,
        synergy_scale=synergy_scale,
        noise=noise,
        mix=mix,
    )
    try:
        path, line = generate_with_summary(out, seed=seed, **knobs)
    except ValueError as err:
        raise _fail(str(err)) from None
    console.print(line)
    console.print(f"synthetic ready: {path}")


@data_app.command("validate")
def data_validate(path: Annotated[Path, typer.Argument(help="dataset directory")]) -> None:
    """Check a dataset in the commlab Parquet format; exit 1 when problems are found."""
    # lazy: commlab.data imports torch, which `import commlab.cli` must not load
    from commlab.data.parquet import validate_dataset

    problems = validate_dataset(path)
    if problems:
        for p in problems:
            err_console.print(f"[red]✗[/] {p}")
        raise typer.Exit(code=1)
    console.print(f"[green]✓[/] {path} is a valid commlab dataset")


@data_app.command("import")
def data_import(
    name: Annotated[
        str, typer.Argument(help="mosi | mosei | humor | sarcasm | mimic | visionandtouch | mmimdb")
    ],
    src: Annotated[
        Path,
        typer.Argument(
            help="published source: a pickle (affect, mimic) or a directory (visionandtouch, mmimdb)"
        ),
    ],
    out: Annotated[Path, typer.Option(help="dataset directory to write")],
    task: Annotated[
        int | None, typer.Option(help="mimic: ICD-9 group 0-19 (default 7), -1 = 6-class mortality")
    ] = None,
    modalities: Annotated[
        str | None,
        typer.Option(help="affect / visionandtouch: modalities to keep, e.g. vision,text"),
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="visionandtouch / mmimdb: resize images to this side")
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option", "-o", help="any importer option as key=value, e.g. -o plot=longest"
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing dataset directory")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Convert published benchmark files into a commlab dataset; nothing is downloaded.

    Pickles (affect, mimic) are read with a restricted unpickler: numpy arrays and builtin
    containers only; a pickle that names anything else (code to run) is refused.

    Options of every importer: docs/datasets.md.
    """
    # lazy: commlab.data imports torch, which `import commlab.cli` must not load
    from commlab.data.importers import import_dataset, parse_options

    try:
        opts = parse_options(option or [])
        given = {"task": task, "modalities": modalities, "image_size": image_size}
        opts.update({k: v for k, v in given.items() if v is not None})
        path = import_dataset(name, src, out, overwrite=overwrite, progress=progress, **opts)
    except (ValueError, FileExistsError) as err:
        raise _fail(str(err)) from None
    console.print(f"[green]✓[/] {name} imported: {path}")


_TRACKING_HELP = (
    "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)"
)


@app.command()
def runs(
    sweep: Annotated[
        str | None, typer.Option(help="show this sweep's trials (sweep name or parent run id)")
    ] = None,
    experiment: Annotated[str | None, typer.Option(help="only this MLflow experiment")] = None,
    sort: Annotated[
        str | None,
        typer.Option(help="rank trials by this metric (default: the sweep's selection metric)"),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(help="max | min for --sort (default: the sweep's mode, else by the name)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (for scripts)")] = False,
    wide: Annotated[
        bool, typer.Option(help="every column: parameters, R/U/S, run ids (default fits 80)")
    ] = False,
    tracking_uri: Annotated[str | None, typer.Option(help=_TRACKING_HELP)] = None,
) -> None:
    """List sweeps, or one sweep's trials ranked by its selection metric (best value over
    each trial's history, the rule of the sweep's best trial and of `commlab promote`)."""
    # lazy: commlab.tracking imports MLflow, which `import commlab.cli` must not load
    from commlab.tracking.query import (
        QueryError,
        list_sweeps,
        sweep_trials,
        sweeps_table,
        trials_table,
    )

    try:
        if sweep is None:
            if sort or mode:
                raise _fail("--sort/--mode rank one sweep's trials: add --sweep NAME")
            rows = list_sweeps(tracking_uri, experiment)
            if as_json:
                typer.echo(json.dumps(rows, indent=1))
            elif not rows:
                console.print("no sweeps yet (run `commlab sweep FILE`)")
            else:
                console.print(sweeps_table(rows, wide=wide))
            return
        data = sweep_trials(sweep, tracking_uri, experiment, sort=sort, mode=mode)
    except (QueryError, ValueError) as err:
        raise _fail(str(err)) from None
    if as_json:
        typer.echo(json.dumps(data, indent=1))
    else:
        console.print(trials_table(data, wide=wide))


@app.command()
def promote(
    sweep: Annotated[str, typer.Option(help="sweep name (or its parent run id)")],
    model: Annotated[str, typer.Option(help="registered model name")],
    alias: Annotated[str, typer.Option(help="alias to point at the new version")] = "champion",
    metric: Annotated[
        str | None, typer.Option(help="rank trials by this metric (default: the sweep's)")
    ] = None,
    mode: Annotated[str | None, typer.Option(help="max | min (needed with --metric)")] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment of the sweep")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (for scripts)")] = False,
    tracking_uri: Annotated[str | None, typer.Option(help=_TRACKING_HELP)] = None,
) -> None:
    """Register the sweep's best FINISHED trial as a model version and set the alias.

    Promoting a trial the model already holds only moves the alias (no duplicate version).
    """
    # lazy: commlab.tracking imports MLflow and torch, which `import commlab.cli` must not load
    from commlab.tracking.model_registry import PromotionError
    from commlab.tracking.model_registry import promote as promote_best
    from commlab.tracking.query import QueryError

    try:
        p = promote_best(
            sweep,
            model,
            alias=alias,
            metric=metric,
            mode=mode,
            experiment=experiment,
            tracking_uri=tracking_uri,
        )
    except (PromotionError, QueryError, ValueError) as err:
        raise _fail(str(err)) from None
    if as_json:
        typer.echo(json.dumps(p.to_dict(), indent=1))
        return
    what = "registered as version" if p.created else "already registered as version"
    console.print(
        f"trial {p.trial_id} of sweep {p.sweep} ({p.metric} = {p.value:.4f}, {p.mode}) "
        f"{what} {p.version} of {p.model}; alias [bold]{p.alias}[/] -> {p.version}"
    )
    console.print(f"load it: commlab.load_encoder({p.uri!r})")


@app.command()
def embed(
    model_uri: Annotated[
        str,
        typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION, a run id, or a checkpoint"),
    ],
    dataset: Annotated[Path, typer.Argument(help="commlab Parquet dataset directory")],
    out: Annotated[Path, typer.Option(help="Parquet file to write")],
    batch_size: Annotated[int, typer.Option(min=1, help="samples per forward pass")] = 256,
    split: Annotated[
        list[str] | None, typer.Option(help="only these splits (repeatable; default: all)")
    ] = None,
    device: Annotated[str, typer.Option(help="torch device")] = "cpu",
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    tracking_uri: Annotated[str | None, typer.Option(help=_TRACKING_HELP)] = None,
) -> None:
    """Embed a dataset with a trained encoder: sample_id, split, embedding (fixed-size list)."""
    # lazy: torch, and MLflow for registry and run references only, which `import commlab.cli`
    # must not load
    from commlab.pretrained import embed_dataset, load_encoder

    try:
        if not Path(model_uri).exists():  # a registry or run reference: the store must answer
            from commlab.tracking.runs import absolute_uri, check_tracking_uri, default_tracking_uri

            check_tracking_uri(
                absolute_uri(tracking_uri) if tracking_uri else default_tracking_uri()
            )
        encoder = load_encoder(model_uri, tracking_uri=tracking_uri, device=device)
        result = embed_dataset(
            encoder, dataset, out, batch_size=batch_size, splits=split, progress=progress
        )
    except (LookupError, ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None
    console.print(
        f"[green]✓[/] {result.rows} embeddings of dimension {result.dim} -> {result.path}"
    )


@app.command()
def ui(
    port: Annotated[int, typer.Option(min=1, max=65535, help="port to serve on")] = 5000,
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    tracking_uri: Annotated[str | None, typer.Option(help=_TRACKING_HELP)] = None,
) -> None:
    """Start the MLflow UI on the project's tracking store (an http store: print its URL)."""
    # lazy: commlab.tracking imports MLflow, which `import commlab.cli` must not load
    from commlab.tracking.query import ui_command
    from commlab.tracking.runs import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    try:
        argv = ui_command(uri, host, port)
    except ValueError as err:
        raise _fail(str(err)) from None
    if argv is None:
        console.print(f"MLflow UI: {uri}")
        return
    console.print(f"MLflow UI: http://{host}:{port}  (store {uri}; Ctrl-C to stop)")
    try:
        code = subprocess.run(argv, check=False).returncode
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code=code)


_JOBS_ADDRESS_HELP = (
    "Ray Jobs API (dashboard) address, http://HOST:8265 (default: $RAY_API_SERVER_ADDRESS, "
    "$RAY_ADDRESS, else http://127.0.0.1:8265)"
)
_TOKEN_FILE_HELP = (
    "file holding the cluster's Ray auth token (default: $RAY_AUTH_TOKEN, "
    "$COMMLAB_RAY_TOKEN_FILE, ~/.ray/auth_token)"
)
jobs_app = typer.Typer(
    help="Ray Jobs on a cluster: list, status, logs, stop.", no_args_is_help=True
)
app.add_typer(jobs_app, name="jobs")


@app.command(context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})
def submit(
    kind: Annotated[str, typer.Argument(help="sweep | pretrain | promote", metavar="KIND")],
    args: Annotated[
        list[str] | None, typer.Argument(help="the arguments of `commlab KIND`", metavar="ARGS")
    ] = None,
    address: Annotated[str | None, typer.Option(help=_JOBS_ADDRESS_HELP)] = None,
    follow: Annotated[
        bool,
        typer.Option(help="stream the logs; exit code = job status (0 ok, 1 failed, 3 stopped)"),
    ] = False,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            help="MLflow tracking URI as the cluster sees it (default: $MLFLOW_TRACKING_URI)"
        ),
    ] = None,
    working_dir: Annotated[
        Path | None,
        typer.Option(help="directory shipped with the job (default: the commlab checkout, else .)"),
    ] = None,
    pip: Annotated[
        list[str] | None, typer.Option(help="extra pip requirement for the job (repeatable)")
    ] = None,
    auth_token_file: Annotated[Path | None, typer.Option(help=_TOKEN_FILE_HELP)] = None,
    submission_id: Annotated[
        str | None, typer.Option(help="the job's id (default: Ray picks one)")
    ] = None,
) -> None:
    """Run `commlab sweep|pretrain|promote ARGS...` on a Ray cluster, as a Ray Job.

    submit's options come before KIND; everything after KIND goes to that command. Files named
    in ARGS are checked here first; the code travels with the job (docker/README.md).
    """
    try:
        sub = jobs.submit(
            kind,
            args or [],
            address=address,
            tracking_uri=tracking_uri,
            working_dir=working_dir,
            pip=pip,
            token_file=auth_token_file,
            submission_id=submission_id,
        )
    except (jobs.SubmitError, ClusterError) as err:
        raise _fail(str(err)) from None
    for warning in sub.spec.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}")
    console.print(f"submitted job [bold]{sub.job_id}[/] to {sub.address}", highlight=False)
    if not follow:
        console.print(f"follow it: commlab jobs logs {sub.job_id} --follow --address {sub.address}")
        return
    interrupted = f"stopped following; the job runs on (commlab jobs stop {sub.job_id})"
    status = _follow(sub.job_id, address, auth_token_file, on_interrupt=interrupted)
    raise typer.Exit(code=jobs.exit_code(status))


def _follow(job_id: str, address: str | None, token_file: Path | None, on_interrupt: str) -> str:
    """Stream a job's logs to stdout until it ends; print its status and, if it failed, a hint."""
    tail = [""]  # the last 20,000 characters: enough for a traceback, bounded for long jobs

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        tail[0] = (tail[0] + text)[-20_000:]

    try:
        status = jobs.follow_job(job_id, address, token_file=token_file, write=write)
    except ClusterError as err:
        raise _fail(str(err)) from None
    except KeyboardInterrupt:
        if on_interrupt:
            err_console.print(on_interrupt)
        raise typer.Exit(code=130) from None
    console.print(f"job {job_id}: {status}", highlight=False)
    hint = jobs.failure_hint(tail[0]) if status == "FAILED" else None
    if hint:
        err_console.print(f"[yellow]hint:[/] {escape(hint)}")
    return status


@jobs_app.command("list")
def jobs_list(
    address: Annotated[str | None, typer.Option(help=_JOBS_ADDRESS_HELP)] = None,
    auth_token_file: Annotated[Path | None, typer.Option(help=_TOKEN_FILE_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (for scripts)")] = False,
) -> None:
    """List the cluster's jobs, oldest first."""
    try:
        rows = jobs.list_jobs(address, token_file=auth_token_file)
    except ClusterError as err:
        raise _fail(str(err)) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
    else:
        console.print(jobs.jobs_table(rows))


@jobs_app.command("status")
def jobs_status(
    job_id: Annotated[str, typer.Argument(help="job (submission) id")],
    address: Annotated[str | None, typer.Option(help=_JOBS_ADDRESS_HELP)] = None,
    auth_token_file: Annotated[Path | None, typer.Option(help=_TOKEN_FILE_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (for scripts)")] = False,
) -> None:
    """Show a job's status (and its message, e.g. why it failed)."""
    try:
        info = jobs.job_info(job_id, address, token_file=auth_token_file)
    except ClusterError as err:
        raise _fail(str(err)) from None
    if as_json:
        typer.echo(json.dumps(info, indent=1))
    else:
        console.print(f"{job_id}: {info['status']}  {info['message'] or ''}", highlight=False)


@jobs_app.command("logs")
def jobs_logs(
    job_id: Annotated[str, typer.Argument(help="job (submission) id")],
    follow: Annotated[
        bool, typer.Option(help="stream until the job ends; exit code = job status")
    ] = False,
    address: Annotated[str | None, typer.Option(help=_JOBS_ADDRESS_HELP)] = None,
    auth_token_file: Annotated[Path | None, typer.Option(help=_TOKEN_FILE_HELP)] = None,
) -> None:
    """Print a job's logs (driver stdout and stderr)."""
    if not follow:
        try:
            typer.echo(jobs.job_logs(job_id, address, token_file=auth_token_file), nl=False)
        except ClusterError as err:
            raise _fail(str(err)) from None
        return
    status = _follow(job_id, address, auth_token_file, on_interrupt="")
    raise typer.Exit(code=jobs.exit_code(status))


@jobs_app.command("stop")
def jobs_stop(
    job_id: Annotated[str, typer.Argument(help="job (submission) id")],
    address: Annotated[str | None, typer.Option(help=_JOBS_ADDRESS_HELP)] = None,
    auth_token_file: Annotated[Path | None, typer.Option(help=_TOKEN_FILE_HELP)] = None,
) -> None:
    """Stop a running job (its trials and workers with it)."""
    try:
        stopped = jobs.stop_job(job_id, address, token_file=auth_token_file)
    except ClusterError as err:
        raise _fail(str(err)) from None
    console.print(f"{job_id}: {'stop requested' if stopped else 'already ended'}")


def main(argv: list[str] | None = None) -> None:
    """The `commlab` entry point: anything unexpected is one line on stderr (exit 1), not a
    traceback; COMMLAB_DEBUG=1 shows the traceback."""
    try:
        app(argv, prog_name="commlab")
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as err:
        if os.environ.get("COMMLAB_DEBUG", "") not in ("", "0"):
            raise
        err_console.print(
            f"[bold red]error:[/] {_one_line(err)} (run again with COMMLAB_DEBUG=1 for the "
            "traceback)",
            soft_wrap=True,
            highlight=False,
        )
        sys.exit(1)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if len(text) > 400:
        text = text[:397] + "..."
    return escape(f"{type(err).__name__}: {text}")


if __name__ == "__main__":
    main()
