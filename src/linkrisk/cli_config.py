"""CLI commands for configuration files: ``linkrisk run``, ``config init`` and ``config check``.

They are registered on the main typer app in :mod:`linkrisk.cli`; the
keys and their CLI options are listed in :mod:`linkrisk.config`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from linkrisk import cli
from linkrisk.errors import ConfigError

config_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Write a commented starting configuration, or check one without running it.")
cli.app.add_typer(config_app, name="config")


@cli.app.command("run")
def run_command(
    ctx: typer.Context,
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="TOML configuration file (write one with: linkrisk config init).")],
    quiet: Annotated[Optional[bool], typer.Option("--quiet/--no-quiet", help="Log warnings only; no progress bars (default: run.quiet).")] = None,
    log_file: Annotated[Optional[Path], typer.Option(help="Append the full log to this file (default: run.log_file).")] = None,
) -> None:
    """Run what a configuration file describes and write results.json, provenance.json and report.html."""
    from linkrisk.config import load_config

    with cli.handle_errors(cli.INTERRUPTED_CHUNKS_AND_POINTS_KEPT):
        resolved = load_config(config)
        run = resolved["run"]
        if quiet is not None:
            run["quiet"] = quiet
        if log_file is not None:
            run["log_file"] = str(log_file.resolve())
        cli.setup_command_logging(run["quiet"], Path(run["log_file"]) if run["log_file"] else None, ctx)
        from linkrisk.runner import check_output_folder, run_config

        check_output_folder(Path(run["out"]))
        if not run["allow_download"]:
            # No library may fetch model files unless the configuration allows it.
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
        run_config(resolved, config.read_text(encoding="utf-8"))
    Console(soft_wrap=True).print(f"run written to {run['out']} (results.json, provenance.json, report.html)")


def _default_data_dir(out: Path) -> str:
    """Return the shared data folder written relative to the configuration file's folder."""
    data = Path(os.environ.get(cli.DATA_ENV, "../shared/data")).resolve()
    return os.path.relpath(data, out.resolve().parent)


@config_app.command("init")
def config_init(
    out: Annotated[Path, typer.Option(help="Configuration file to write.")] = Path("linkrisk.toml"),
    demo: Annotated[bool, typer.Option(help="Write the demo's configuration (shared data, fixed DP noise seed) instead of the model-audit example.")] = False,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starting configuration that lists every key with its default."""
    from linkrisk._io import write_text
    from linkrisk.config import template

    with cli.handle_errors():
        if out.exists() and not force:
            raise ConfigError(f"{out} exists; pass --force to overwrite it or choose another --out")
        write_text(out, template(demo=demo, data_dir=_default_data_dir(out)))
    Console(soft_wrap=True).print(f"wrote {out}; edit it, then run: linkrisk run {out}")


@config_app.command("check")
def config_check(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="TOML configuration file.")],
) -> None:
    """Check a configuration file and print it resolved (defaults filled in, paths absolute), without running."""
    from linkrisk.config import load_config

    with cli.handle_errors():
        resolved = load_config(config)
    typer.echo(json.dumps(resolved, indent=2))
