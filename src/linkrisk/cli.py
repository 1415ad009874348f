"""Command-line interface: ``linkrisk demo`` and ``linkrisk audit``.

A :class:`~linkrisk.errors.LinkriskError` is printed as one line on
standard error with exit status 2; no traceback reaches the user for an
input problem.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from linkrisk import __version__
from linkrisk.errors import ConfigError, LinkriskError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Measure and reduce image-to-report re-linkage risk in vision-language embeddings.")
err_console = Console(stderr=True)

DATA_ENV = "LINKRISK_DATA"


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", datefmt="%H:%M:%S",
                        handlers=[RichHandler(console=err_console, show_path=False, markup=False)], force=True)


def _fail(err: LinkriskError) -> None:
    err_console.print(f"[bold red]error:[/] {err}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _fail_io(err: OSError | EOFError) -> None:
    """Report a file-system failure (missing folder, permissions, full disk, truncated file) as one line."""
    where = getattr(err, "filename", None)
    reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
    target = f"{where}: " if where else ""
    _fail(LinkriskError(f"{target}{reason}; check the path and its permissions, then run again"))


def _parse_pools(text: str) -> list[int | str]:
    pools: list[int | str] = []
    for part in text.split(","):
        part = part.strip()
        if part == "full":
            pools.append("full")
        elif re.fullmatch(r"[0-9]+", part) and int(part) >= 2:
            pools.append(int(part))
        else:
            raise ConfigError(f"invalid pool size {part!r} in --pools; use integers >= 2 or 'full', comma-separated")
    return pools


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise ConfigError(f"invalid --ks {text!r}; use positive integers, comma-separated (for example 1,5,10)")
    return ks


@app.command()
def demo(
    data: Annotated[Optional[Path], typer.Option(help=f"Folder with covid-chestxray/ and openi/ (default: ${DATA_ENV} or ../shared/data).")] = None,
    out: Annotated[Path, typer.Option(help="Output folder for results.json, report.html, embeddings/ and models/.")] = Path("runs/demo"),
    cache_dir: Annotated[Optional[Path], typer.Option(help="Encoder feature cache (default: OUT/cache).")] = None,
    epsilon: Annotated[float, typer.Option(help="Target ε of the DP heads, per patient.")] = 0.34,
    delta: Annotated[Optional[float], typer.Option(help="Target δ (default: 6e-6, or 0.1/n when smaller).")] = None,
    dp_noise_seed: Annotated[Optional[int], typer.Option(min=0, max=2**62, help="Seed DP sampling and noise for a reproducible run; ε is then not a formal guarantee (default: fresh OS entropy).")] = None,
    secure_mode: Annotated[bool, typer.Option(help="Draw DP noise from a cryptographically secure generator (Opacus secure_mode; needs torchcsprng).")] = False,
    image_encoder: Annotated[str, typer.Option(help="Frozen image encoder: randconv or histdct.")] = "randconv",
    text_weights: Annotated[Optional[Path], typer.Option(help="Folder with WordLlama weights/ and tokenizers/ (default: the installed wordllama package).")] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Seed for the split, head fitting, public DP choices and bootstraps (DP noise: see --dp-noise-seed).")] = 0,
    n_boot: Annotated[int, typer.Option(min=1, help="Patient-bootstrap resamples per interval.")] = 2000,
    quiet: Annotated[bool, typer.Option(help="Log warnings only; no progress bars.")] = False,
) -> None:
    """Train, audit, mitigate with DP, re-audit and probe on the real COVID-19 and Open-i cohorts."""
    _setup_logging(quiet)
    from linkrisk.mitigate import DPConfig, validate_privacy_target
    from linkrisk.pipeline import DemoConfig, run_demo

    data_dir = data or Path(os.environ.get(DATA_ENV, "../shared/data"))
    try:
        validate_privacy_target(epsilon, delta)
        if not data_dir.is_dir():
            raise ConfigError(f"data folder {data_dir} not found; pass --data or set {DATA_ENV}")
        config = DemoConfig(data_dir=data_dir, out_dir=out, cache_dir=cache_dir, image_encoder=image_encoder,
                            text_weights=text_weights, seed=seed, n_boot=n_boot, dp=DPConfig(epsilon=epsilon, delta=delta, noise_seed=dp_noise_seed,
                                                     secure_mode=secure_mode), progress=not quiet)
        run_demo(config)
    except LinkriskError as err:
        _fail(err)
    except (OSError, EOFError) as err:
        _fail_io(err)


@app.command()
def audit(
    embeddings: Annotated[Path, typer.Argument(metavar="EMBEDDINGS", help="Folder with image.npy, report.npy and pairs.parquet.")],
    pools: Annotated[str, typer.Option(help="Candidate pool sizes, comma-separated; 'full' is the whole set.")] = "10,100,1000,full",
    ks: Annotated[str, typer.Option(help="Recall cut-offs K, comma-separated.")] = "1,5,10",
    n_boot: Annotated[int, typer.Option(min=1, help="Patient-bootstrap resamples per interval.")] = 2000,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Bootstrap seed.")] = 0,
    negatives: Annotated[str, typer.Option(help="Pool negatives: random (uniform) or label-matched (same label vector as the true report; needs reports.parquet).")] = "random",
    label_policy: Annotated[str, typer.Option(help="With label-matched: uncertain and blank labels as zeros, ones (uncertain only), or ignore.")] = "zeros",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the audit as JSON here.")] = None,
) -> None:
    """Audit saved embeddings: image-to-report Recall@K with lift and patient-bootstrap intervals."""
    _setup_logging(quiet=True)
    from linkrisk.audit.embeddings import audit_folder
    from linkrisk._io import write_json

    try:
        result = audit_folder(embeddings, _parse_pools(pools), _parse_ks(ks), n_boot=n_boot, seed=seed,
                              negatives=negatives, label_policy=label_policy)
    except LinkriskError as err:
        _fail(err)
    except (OSError, EOFError) as err:
        _fail_io(err)
    console = Console()
    console.print(f"{result['n_queries']} queries, {result['n_candidates']} candidates, "
                  f"{result['queries_with_ties']} with ties")
    for entry in result["recall"]:
        console.print(f"  N={entry['pool']!s:>5} K={entry['k']:>3}  Recall {entry['value']:.4f} "
                      f"[{entry['ci95'][0]:.4f}, {entry['ci95'][1]:.4f}]  chance {entry['chance']:.4f}  "
                      f"lift {entry['lift']:.2f}")
    if "full_pool" in result:
        console.print(f"  mean normalised rank {result['full_pool']['mean_normalised_rank']:.4f} (chance 0.5)")
    else:
        console.print(f"  label policy {result['label_policy']}; {result['n_queries_without_labels']} queries and "
                      f"{result['n_candidates_without_labels']} candidates without labels left out")
    if json_out:
        try:
            write_json(json_out, result)
        except OSError as err:
            _fail_io(err)


@app.command()
def version() -> None:
    """Print the linkrisk version."""
    typer.echo(__version__)


def main() -> None:
    app(prog_name="linkrisk")


if __name__ == "__main__":
    sys.exit(main())
