"""Command-line interface: ``linkrisk demo``, ``audit``, ``embed``, ``mitigate``, ``report`` and ``data describe``.

Exit status 0 means success, and 1 a failed run: invalid or unreadable
input data, a missing file, an I/O error such as a full disk, or a bug,
which keeps its traceback. Status 2 is a usage error, meaning a
:class:`~linkrisk.errors.ConfigError` or one of click's own errors such as
an unknown option. Status 130 follows Ctrl-C. An expected error is printed
as one ``error: ...`` line on standard error. :func:`handle_errors` and
:func:`setup_command_logging` serve the commands of
:mod:`linkrisk.cli_config` too.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.text import Text

from linkrisk import __version__
from linkrisk._logging import configure_logging, log_to_file
from linkrisk.api import normalise_choice
from linkrisk.errors import ConfigError, InputError, LinkriskError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command ended by Ctrl-C

EXIT_STATUS_HELP = """Exit status:
0    success
1    failure: invalid or unreadable input data, a missing file or folder,
     an I/O error such as a full disk, or a run that failed
2    usage error: an invalid option value or config entry, or an unknown option
130  interrupted (Ctrl-C); finished cache chunks, epsilon points and DP
     training epochs are kept, so the same command resumes from them"""

app = typer.Typer(add_completion=False, no_args_is_help=True, epilog=EXIT_STATUS_HELP,
                  help="Measure and reduce image-to-report re-linkage risk in vision-language embeddings.")
err_console = Console(stderr=True)

DATA_ENV = "LINKRISK_DATA"

# Options shared by every command that runs a step; cli_config reuses them.
QuietOption = Annotated[bool, typer.Option(
    help="Show only warnings and errors on the console, and no progress bars; --log-file still gets the full log.")]
LogFileOption = Annotated[Optional[Path], typer.Option(
    help="Append the full log (INFO and above, with timestamps, even with --quiet) to this file; a new file gets "
         "mode 0600. linkrisk logs counts, ids and paths, not report text.")]

# The one-line messages after Ctrl-C: what a rerun of the same command reuses.
INTERRUPTED_NOTHING_KEPT = "interrupted; nothing was written"
INTERRUPTED_CHUNKS_KEPT = "interrupted; finished cache chunks are kept, so the same command resumes from them"
INTERRUPTED_POINTS_KEPT = ("interrupted; finished epsilon points and DP training epochs are kept, so the same "
                           "command resumes from them")
INTERRUPTED_CHUNKS_AND_POINTS_KEPT = ("interrupted; finished cache chunks, epsilon points and DP training epochs are "
                                      "kept, so the same command resumes from them")


def exit_code_for(err: BaseException) -> int:
    """Return the exit status of an error: 2 for a ConfigError (usage), 130 for Ctrl-C, 1 for anything else."""
    if isinstance(err, ConfigError):
        return EXIT_USAGE
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILURE


def error_message(err: BaseException) -> str:
    """Return the one-line message of an error. A file-system error also names the path and the next step."""
    if isinstance(err, LinkriskError) or not isinstance(err, (OSError, EOFError)):
        return str(err) or type(err).__name__
    where = getattr(err, "filename", None)
    reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
    target = f"{where}: " if where else ""
    if getattr(err, "errno", None) == errno.ENOSPC:
        return (f"{target}{reason}; free disk space and run the same command again (complete files and cache "
                "chunks are kept)")
    return f"{target}{reason}; check the path and its permissions, then run again"


def fail(err: BaseException | str, code: int | None = None) -> NoReturn:
    """Print ``err`` as one ``error: ...`` line on standard error, log it to the log file and exit.

    The exit status is ``code``, or :func:`exit_code_for` of ``err`` (1
    for a plain string).
    """
    message = err if isinstance(err, str) else error_message(err)
    if code is None:
        code = EXIT_FAILURE if isinstance(err, str) else exit_code_for(err)
    log_to_file(logging.ERROR, "exit status %d: %s", code, message)
    # The message is printed as written: paths and shapes may contain square brackets.
    err_console.print(Text("error: ", style="bold red") + Text(message), highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


@contextlib.contextmanager
def handle_errors(interrupted: str = INTERRUPTED_NOTHING_KEPT) -> Iterator[None]:
    """Turn expected errors in the block into one-line messages and exit statuses.

    ConfigError exits with 2; other LinkriskErrors, OSError and EOFError
    exit with 1; KeyboardInterrupt prints ``interrupted`` and exits with
    130. Any other exception is a bug and keeps its traceback. A block
    that ends normally logs its wall time to the log file.
    """
    started = time.perf_counter()
    try:
        yield
    except (LinkriskError, OSError, EOFError) as err:
        fail(err)
    except KeyboardInterrupt:
        fail(interrupted, EXIT_INTERRUPTED)
    log_to_file(logging.INFO, "finished in %.1f s", time.perf_counter() - started)


def setup_command_logging(quiet: bool, log_file: Path | None, ctx: typer.Context | None = None) -> None:
    """Configure logging for a command and write its name, version and options to the log file.

    ``ctx`` names the command and its resolved options; without it the
    process's command line is logged. Call this inside
    :func:`handle_errors`, which turns a log file that cannot be opened
    into exit status 1.
    """
    configure_logging(quiet, log_file, console=err_console)
    if ctx is None:
        log_to_file(logging.INFO, "linkrisk %s started (pid %d): %s", __version__, os.getpid(),
                    shlex.join(sys.argv))
        return
    options = {key: str(value) if isinstance(value, Path) else value for key, value in ctx.params.items()}
    log_to_file(logging.INFO, "linkrisk %s started (pid %d): %s with %s", __version__, os.getpid(),
                ctx.command_path, options)


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


def _parse_match(text: str | None) -> list[str] | None:
    if text is None:
        return None
    columns = [part.strip() for part in text.split(",")]
    if not all(columns):
        raise ConfigError(f"invalid --match {text!r}; name attribute columns, comma-separated (for example view,sex)")
    return columns


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
    ctx: typer.Context,
    data: Annotated[Optional[Path], typer.Option(help=f"Folder with covid-chestxray/ and openi/ (default: ${DATA_ENV}, else ../shared/data).")] = None,
    out: Annotated[Path, typer.Option(help="Output folder for results.json, report.html, embeddings/ and models/; created if missing.")] = Path("runs/demo"),
    cache_dir: Annotated[Optional[Path], typer.Option(help="Folder of the encoder feature cache, reused by later runs (default: OUT/cache).")] = None,
    epsilon: Annotated[float, typer.Option(help="Target privacy budget ε of the DP heads, per patient; above 0 and at most 100.")] = 0.34,
    delta: Annotated[Optional[float], typer.Option(help="Target δ of the DP guarantee, per patient; between 0 and 1 (default: 6e-6, or 0.1 / patients when smaller).")] = None,
    dp_noise_seed: Annotated[Optional[int], typer.Option(min=0, max=2**62, help="Integer seed (0 to 2^62) of DP sampling and noise for a reproducible run; ε is then not a formal guarantee (default: fresh OS entropy).")] = None,
    secure_mode: Annotated[bool, typer.Option(help="Draw DP noise from a cryptographically secure generator (Opacus secure_mode; needs torchcsprng).")] = False,
    image_encoder: Annotated[str, typer.Option(help="Frozen image encoder of the offline reference model: randconv or histdct.")] = "randconv",
    text_weights: Annotated[Optional[Path], typer.Option(help="Folder with WordLlama weights/ and tokenizers/ (default: the installed wordllama package).")] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Integer seed (0 to 2^32 - 1) of the split, head fitting, public DP choices and bootstraps (DP noise: see --dp-noise-seed).")] = 0,
    n_boot: Annotated[int, typer.Option(min=1, help="Patient-bootstrap resamples per 95% interval (count, at least 1).")] = 1000,
    quiet: QuietOption = False,
    log_file: LogFileOption = None,
) -> None:
    """Train, audit, mitigate with DP, re-audit and probe on the real COVID-19 and Open-i cohorts."""
    with handle_errors(INTERRUPTED_CHUNKS_AND_POINTS_KEPT):
        setup_command_logging(quiet, log_file, ctx)
        from linkrisk.mitigate import DPConfig, validate_privacy_target
        from linkrisk.models.image_encoders import IMAGE_ENCODERS
        from linkrisk.pipeline import DemoConfig, run_demo

        validate_privacy_target(epsilon, delta)
        _check_secure_mode(secure_mode)
        image_encoder = normalise_choice(image_encoder, tuple(IMAGE_ENCODERS), "--image-encoder")
        data_dir = data or Path(os.environ.get(DATA_ENV, "../shared/data"))
        if not data_dir.is_dir():
            raise InputError(f"data folder {data_dir} not found; pass --data or set {DATA_ENV}")
        if text_weights is not None and not text_weights.is_dir():
            raise InputError(f"--text-weights {text_weights}: folder not found; pass the folder holding WordLlama "
                             "weights/ and tokenizers/, or leave the option out")
        config = DemoConfig(data_dir=data_dir, out_dir=out, cache_dir=cache_dir, image_encoder=image_encoder,
                            text_weights=text_weights, seed=seed, n_boot=n_boot,
                            dp=DPConfig(epsilon=epsilon, delta=delta, noise_seed=dp_noise_seed,
                                        secure_mode=secure_mode),
                            progress=not quiet)
        run_demo(config)


def _check_secure_mode(secure_mode: bool) -> None:
    """Raise ConfigError before any work when --secure-mode is set but torchcsprng is not installed."""
    if secure_mode and importlib.util.find_spec("torchcsprng") is None:
        raise ConfigError("--secure-mode needs the torchcsprng package, which is not installed; install a "
                          "torchcsprng build for this torch version or leave out --secure-mode")


def _check_folder(path: Path, option: str, what: str) -> None:
    if not path.is_dir():
        raise InputError(f"{option} {path}: folder not found; pass {what}")


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"invalid --device {text!r} ({err}); use cpu, cuda or cuda:0") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {text}: no CUDA device is available here; use cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {text}: no MPS device is available here; use cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {text}: unsupported device type {device.type!r}; use cpu or cuda")
    return str(device)


def _print_audit(result: dict) -> None:
    console = Console()
    console.print(f"{result['direction'].replace('_', ' ')}, {result['level']} level, {result['image_level']} "
                  f"images, {result['negatives'].replace('_', '-')} negatives: {result['n_queries']} queries, "
                  f"{result['n_candidates']} candidates ({result['candidate_unit']}), "
                  f"{result['queries_with_ties']} with ties; values use {result['tie_rule']} ties")
    if result.get("n_merged_candidates"):
        console.print(f"  {result['n_merged_candidates']} report rows merged into an identical text")
    for entry in result["recall"]:
        line = (f"  N={entry['pool']!s:>5} K={entry['k']:>3}  Recall {entry['value']:.4f} "
                f"[{entry['ci95'][0]:.4f}, {entry['ci95'][1]:.4f}]  chance {entry['chance']:.4f}  "
                f"lift {entry['lift']:.2f}")
        if result["queries_with_ties"] and "optimistic" in entry:
            line += f"  ties: {entry['pessimistic']:.4f}..{entry['optimistic']:.4f}"
        if "fallback_share" in entry and entry["fallback_share"]:
            line += f"  nearest-label fill {entry['fallback_share']:.0%} (distance <= {entry['max_label_distance']})"
        elif "full_pool_share" in entry and entry["pool"] != "full":
            line += f"  full pools {entry['full_pool_share']:.0%}"
        console.print(line)
    if "full_pool" in result:
        full = result["full_pool"]
        console.print(f"  full pool: mean normalised rank {full['mean_normalised_rank']:.4f} (chance 0.5), "
                      f"median rank {full['median_rank']:.1f}, MRR {full['mean_reciprocal_rank']:.4f}")
    else:
        console.print(f"  label policy {result['label_policy']}; {result['n_queries_without_labels']} queries and "
                      f"{result['n_candidates_without_labels']} candidates without labels left out")
    test = result.get("permutation_test")
    if test:
        console.print(f"  permutation test ({test['n_permutations']} patient permutations): mean normalised rank "
                      f"p = {test['mean_normalised_rank']['p_value']:.4f}; " + ", ".join(
                          f"Recall@{e['k']} N={e['pool']} p = {e['p_value']:.4f}" for e in test["recall"]))
    for bound in result.get("upper_bounds", []):
        console.print(f"  N={bound['pool']!s:>5} K={bound['k']:>3}  Recall at most {bound['upper']:.4f} "
                      f"({bound['lift_upper']:.2f}x chance) with {bound['level']:.0%} confidence "
                      f"({bound['upper_method'].replace('_', '-')} bound)")
    for entry in result.get("monte_carlo", []):
        console.print(f"  Monte Carlo N={entry['pool']!s:>5} K={entry['k']:>3}  {entry['value']:.4f} "
                      f"[{entry['ci95'][0]:.4f}, {entry['ci95'][1]:.4f}] over {entry['n_pools']} pools per query; "
                      f"closed form {entry['closed_form']:.4f}")
    if "linkage_auc" in result:
        auc = result["linkage_auc"]
        console.print(f"  linkage AUC {auc['value']:.4f} [{auc['ci95'][0]:.4f}, {auc['ci95'][1]:.4f}] (chance 0.5)")
    for entry in result.get("power", []):
        needed = entry["required_queries"] if entry["required_queries"] is not None else "over 10 million"
        console.print(f"  power N={entry['pool']!s:>5}: {entry['power_at_queries']:.0%} to detect {entry['lift']:g}x "
                      f"chance with {entry['n_queries']} queries ({entry['power_at_patients']:.0%} counting one per "
                      f"patient); {needed} queries give {entry['target_power']:.0%}")
    _print_attributes(console, result)


def _print_attributes(console: Console, result: dict) -> None:
    matched = result.get("attribute_matched")
    if matched:
        console.print(f"attribute-matched pools on {', '.join(matched['attributes'])}: "
                      f"{matched.get('n_queries', 0)} queries; left out for a missing value: "
                      f"{matched.get('n_queries_with_missing', 0)} queries and "
                      f"{matched.get('n_candidates_with_missing', 0)} candidates")
        for entry in matched["recall"]:
            effective = entry["effective_pool"]
            console.print(f"  N={entry['pool']!s:>5} K={entry['k']:>3}  Recall {entry['value']:.4f} "
                          f"[{entry['ci95'][0]:.4f}, {entry['ci95'][1]:.4f}]  chance {entry['chance']:.4f}  "
                          f"lift {entry['lift']:.2f}  effective pool {effective['min']}/{effective['median']:g}/"
                          f"{effective['max']}  full pools {entry['full_pool_share']:.0%}")
    oracle = result.get("attribute_oracle")
    if oracle:
        console.print(f"attribute oracle on {', '.join(oracle['attributes'])} (links by equal attributes alone, "
                      "ties at random) beside the model, uniform pools:")
    for entry in result.get("oracle_comparison", []):
        ratio = f"{entry['ratio']:.2f}x" if entry.get("ratio") is not None else "n/a"
        console.print(f"  oracle N={entry['pool']!s:>5} K={entry['k']:>3}  model {entry['model']:.4f}  oracle "
                      f"{entry['oracle']:.4f}  excess {entry['excess']:+.4f} [{entry['excess_ci95'][0]:+.4f}, "
                      f"{entry['excess_ci95'][1]:+.4f}]  model / oracle {ratio}")


@app.command()
def audit(
    ctx: typer.Context,
    embeddings: Annotated[str, typer.Argument(metavar="EMBEDDINGS", help="Folder with image.npy, report.npy and pairs.parquet (and reports.parquet for labels), or manifest:PATH with both embedding columns.")],
    pools: Annotated[str, typer.Option(help="Candidate pool sizes N (candidates per pool, integers of at least 2), comma-separated; full is the whole candidate set.")] = "10,100,1000,full",
    ks: Annotated[str, typer.Option(help="Recall cut-offs K (ranks, integers of at least 1), comma-separated.")] = "1,5,10",
    direction: Annotated[str, typer.Option(help="image-to-report (an image looks for its report) or report-to-image.")] = "image-to-report",
    level: Annotated[str, typer.Option(help="study (only the own study is a hit) or patient (any study of the same patient is a hit; pools of patients).")] = "study",
    image_level: Annotated[str, typer.Option(help="image (each image on its own) or study-mean (mean embedding of a study's images).")] = "image",
    merge_identical: Annotated[bool, typer.Option(help="Merge identical report texts into one candidate (image-to-report, study level).")] = False,
    ties: Annotated[str, typer.Option(help="Tie rule for reported values: random, optimistic or pessimistic (with random negatives all three are in the JSON).")] = "random",
    negatives: Annotated[str, typer.Option(help="Pool negatives: random (uniform) or label-matched (same label vector as the true report; needs reports.parquet).")] = "random",
    label_policy: Annotated[str, typer.Option(help="With label-matched: zeros (uncertain -1 and blank labels count as negative), ones (uncertain as positive, blank as negative) or ignore (drop the true report's uncertain and blank observations).")] = "zeros",
    fallback: Annotated[str, typer.Option(help="With label-matched: none (cap small groups) or nearest-label (fill pools by smallest label distance).")] = "none",
    monte_carlo: Annotated[int, typer.Option(min=0, help="Also sample this many explicit pools per query and pool size (count; random negatives), beside the closed form; 0 turns it off. Slow: time grows with queries x pools x N (minutes at 10,000 queries).")] = 0,
    permutations: Annotated[int, typer.Option(min=0, help="Patient permutations of the test of \"no linkage\" (count; random negatives): p-values for Recall@K and the mean normalised rank. 0 turns it off.")] = 0,
    match: Annotated[Optional[str], typer.Option(help="Attributes, comma-separated, for attribute-matched pools and an attacker that links by them alone (image-to-report): columns of images.parquet (view, sex, age_band, site, source, file_format, size_band, ...) or reports.parquet, or labels for the label vector.")] = None,
    n_boot: Annotated[int, typer.Option(min=1, help="Patient-bootstrap resamples per 95% interval (count, at least 1).")] = 1000,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Integer seed (0 to 2^32 - 1) of the bootstrap and the Monte Carlo pools.")] = 0,
    device: Annotated[str, typer.Option(help="Torch device for the score matmul: cpu, cuda, cuda:1, ...")] = "cpu",
    precision: Annotated[str, typer.Option(help="Score matmul precision: fp32, or bf16 / fp16 with ties and near-ties re-scored in float64 (the counts equal those of exact scores).")] = "fp32",
    block_size: Annotated[Optional[int], typer.Option(min=1, help="Queries scored per matmul (count, at least 1; default: as many as fit in 128 MiB on CPU or half the free GPU memory).")] = None,
    engine: Annotated[str, typer.Option(help="Where rank counting runs: local (this process) or ray (query blocks as Ray tasks; needs linkrisk[ray]). Both give identical counts.")] = "local",
    address: Annotated[Optional[str], typer.Option(help="With --engine ray: local (start a cluster for this run; default), auto (the cluster `ray start` started) or ray://HOST:PORT.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the audit as JSON to this file.")] = None,
    quiet: QuietOption = False,
    log_file: LogFileOption = None,
) -> None:
    """Audit saved embeddings: Recall@K with lift and patient-bootstrap intervals."""
    with handle_errors():
        setup_command_logging(quiet, log_file, ctx)
        from linkrisk._io import write_json
        from linkrisk._ray import ENGINES, check_engine
        from linkrisk.audit.design import DIRECTIONS, IMAGE_LEVELS, LEVELS
        from linkrisk.audit.distributed import counting_engine
        from linkrisk.audit.embeddings import audit_folder
        from linkrisk.audit.negatives import LABEL_POLICIES
        from linkrisk.audit.ranks import PRECISIONS
        from linkrisk.audit.recall import TIE_RULES
        from linkrisk.audit.run import NEGATIVES

        fallback_choice = normalise_choice(fallback, ("none", "nearest_label"), "--fallback")
        engine = normalise_choice(engine, ENGINES, "--engine")
        check_engine(engine, address)
        with counting_engine(engine, address) as counting:
            result = audit_folder(
                embeddings, _parse_pools(pools), _parse_ks(ks), n_boot=n_boot, seed=seed,
                negatives=normalise_choice(negatives, NEGATIVES, "--negatives"),
                label_policy=normalise_choice(label_policy, LABEL_POLICIES, "--label-policy"),
                direction=normalise_choice(direction, DIRECTIONS, "--direction"),
                level=normalise_choice(level, LEVELS, "--level"),
                image_level=normalise_choice(image_level, IMAGE_LEVELS, "--image-level"), merge_identical=merge_identical,
                ties=normalise_choice(ties, TIE_RULES, "--ties"), fallback=None if fallback_choice == "none" else fallback_choice,
                monte_carlo_pools=monte_carlo, permutations=permutations, match=_parse_match(match),
                device=_device(device), precision=normalise_choice(precision, PRECISIONS, "--precision"),
                block_size=block_size, engine=counting)
        _print_audit(result)
        if not result["recall"]:
            err_console.print(Text("warning: no Recall@K entry left: every K is at least its pool size N; "
                                   "choose smaller --ks or larger --pools", style="yellow"), soft_wrap=True)
        if json_out:
            write_json(json_out, result)


@app.command()
def embed(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Model adapter name: clip-vit-b-32, open-clip, biomedclip, hf-clip, chexzero, biovil, biovil-t, reference or precomputed (see docs/models.md).")],
    weights: Annotated[str, typer.Option(help="Local weights file or folder of the model; hf-hub:ORG/REPO for open_clip models with --allow-download.")],
    dataset: Annotated[str, typer.Option(help="Dataset as NAME:PATH, e.g. covid:../shared/data/covid-chestxray.")],
    out: Annotated[str, typer.Option(help="Output folder: features, ids, heads, projected embeddings, embed.json and cache/.")],
    text_policy: Annotated[Optional[str], typer.Option(help="Report sections forming the text, e.g. findings+impression or impression,fallback=full.")] = None,
    device: Annotated[str, typer.Option(help="Torch device of the forward pass: cpu, cuda, cuda:1, mps.")] = "cpu",
    precision: Annotated[str, typer.Option(help="Forward-pass precision: fp32, or bf16 / fp16 autocast (GPU only).")] = "fp32",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass (count, at least 1).")] = 32,
    text_batch_size: Annotated[int, typer.Option(min=1, help="Reports per forward pass (count, at least 1).")] = 64,
    chunk_size: Annotated[int, typer.Option(min=1, help="Images (and reports) per cache chunk (count, at least 1); a killed run recomputes at most one chunk.")] = 512,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader worker processes decoding images (count; 0 decodes in the main process).")] = 2,
    fast_decode: Annotated[bool, typer.Option(help="Decode JPEGs at reduced scale (at least twice the model's input size in pixels): faster, pixels differ slightly from the model's own preprocessing.")] = False,
    allow_download: Annotated[bool, typer.Option(help="Let Hugging Face libraries reach the network for missing files (default: offline).")] = False,
    engine: Annotated[str, typer.Option(help="Where encoding runs: local (this process and its DataLoader workers) or ray (decoding as Ray tasks, encoders in Ray Data actor pools; needs linkrisk[ray]). Same cache and outputs.")] = "local",
    address: Annotated[Optional[str], typer.Option(help="With --engine ray: local (start a cluster for this run; default), auto (the cluster `ray start` started) or ray://HOST:PORT.")] = None,
    actors: Annotated[int, typer.Option(min=0, help="With --engine ray: encoder actors (count; 0 means one per GPU, or half the cluster's CPUs without GPUs).")] = 0,
    quiet: QuietOption = False,
    log_file: LogFileOption = None,
) -> None:
    """Embed a dataset's images and reports with a model's frozen towers; cached in chunks and resumable."""
    with handle_errors(INTERRUPTED_CHUNKS_KEPT):
        setup_command_logging(quiet, log_file, ctx)
        if not allow_download:
            # HF_HUB_OFFLINE semantics by default: no library may fetch files behind the user's back.
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
        from linkrisk.data.registry import load_dataset
        from linkrisk.data.sections import TextPolicy
        from linkrisk.models.adapters import load_adapter
        from linkrisk._ray import ENGINES
        from linkrisk.models.embed import PRECISIONS, EmbedConfig, embed_cohort, hash_weights

        if not out.strip():
            raise ConfigError("--out is empty; name the output folder")
        out_dir = Path(out)
        if not weights.startswith("hf-hub:") and Path(weights).is_dir() and \
                out_dir.resolve().is_relative_to(Path(weights).resolve()):
            raise ConfigError(f"--out {out} is inside the weights folder {weights}, whose hash keys the cache; "
                              "choose an --out outside it")
        config = EmbedConfig(batch_size=batch_size, text_batch_size=text_batch_size, chunk_size=chunk_size,
                             workers=workers, device=_device(device), fast_decode=fast_decode,
                             precision=normalise_choice(precision, PRECISIONS, "--precision"), progress=not quiet,
                             engine=normalise_choice(engine, ENGINES, "--engine"), address=address,
                             actors=actors).validate()
        cohort = load_dataset(dataset, TextPolicy.parse(text_policy) if text_policy else None)
        adapter = load_adapter(model, weights, allow_download=allow_download)
        weights_path = getattr(adapter, "weights_path", weights)
        summary = embed_cohort(adapter, cohort, out_dir, config,
                               {"model": model, "weights": str(weights), "weights_sha256": hash_weights(weights_path)})
        counts = summary["dataset"]
        Console(soft_wrap=True).print(
            f"{counts['name']}: {counts['n_images']} images and {counts['n_reports']} reports embedded into {out} "
            f"(features {summary['model']['image_feature_shape']} / {summary['model']['text_feature_dim']}, "
            f"embeddings {summary['model']['embed_dim']}-d); audit with: linkrisk audit {out}")


def _check_range(value: float | None, low: float, high: float | None, low_open: bool = False,
                 high_open: bool = False) -> float | None:
    """Option callback: reject a number outside ``low``..``high`` as a usage error that names the option."""
    if value is None:
        return value
    above = value > low if low_open else value >= low
    below = high is None or (value < high if high_open else value <= high)
    if not (above and below):
        lower = f"above {low:g}" if low_open else f"at least {low:g}"
        upper = "" if high is None else f" and {'below' if high_open else 'at most'} {high:g}"
        raise typer.BadParameter(f"{value:g} is out of range; use a number {lower}{upper}")
    return value


def _parse_epsilons(text: str) -> list[float]:
    values = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            value = float("inf") if part in ("inf", "infinity") else float(part)
        except ValueError:
            value = float("nan")
        if not (value > 0):
            raise ConfigError(f"invalid epsilon {part!r} in --epsilons; use positive numbers or inf, comma-separated")
        values.append(value)
    return values


@app.command()
def mitigate(
    ctx: typer.Context,
    train: Annotated[Path, typer.Option(help="Private training cohort: a folder written by linkrisk embed.")],
    public: Annotated[Path, typer.Option(help="Cohort marked public (negative bank, and the start with --init public): a linkrisk embed folder.")],
    out: Annotated[Path, typer.Option(help="Output folder: mitigate.json, report.html, heads/ (one folder per epsilon).")],
    target: Annotated[Optional[list[Path]], typer.Option(help="Other cohort to audit and probe with each set of heads (repeat the option); a linkrisk embed folder. The training patients are always audited.")] = None,
    epsilons: Annotated[str, typer.Option(help="Target privacy budgets ε per patient, comma-separated, each above 0 and at most 100; inf trains without clipping or noise.")] = "0.1,0.34,1,3,10,inf",
    delta: Annotated[Optional[float], typer.Option(help="Target δ of the DP guarantee, per patient; between 0 and 1 (default: 6e-6, or 0.1 / patients when smaller).")] = None,
    loss: Annotated[str, typer.Option(help="public-bank (sound for DP) or in-batch (CLIP loss; epsilon is then no formal guarantee).")] = "public-bank",
    init: Annotated[str, typer.Option(help="original (fine-tune the model's heads) or public (fresh heads from public features).")] = "original",
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training patients (count, at least 1).")] = 20,
    batch_size: Annotated[int, typer.Option(min=1, help="Expected patients per step (count, at least 1); sampling rate = batch size / patients.")] = 64,
    sample_rate: Annotated[Optional[float], typer.Option(callback=lambda value: _check_range(value, 0, 1, low_open=True), help="Poisson sampling rate per step: the fraction of patients, above 0 and at most 1; overrides --batch-size.")] = None,
    max_grad_norm: Annotated[float, typer.Option(callback=lambda value: _check_range(value, 0, None, low_open=True), help="Per-patient gradient clipping norm C (L2 norm, above 0).")] = 1.0,
    lr: Annotated[float, typer.Option(callback=lambda value: _check_range(value, 0, None, low_open=True), help="SGD learning rate (above 0; momentum 0.9).")] = 0.05,
    holdout: Annotated[float, typer.Option(callback=lambda value: _check_range(value, 0, 1, high_open=True), help="Fraction of the training folder's patients (0 to below 1) kept out of training and audited as held-out patients; 0 keeps none out.")] = 0.0,
    refit_aux: Annotated[Optional[Path], typer.Option(help="Attacker's auxiliary pairs (a linkrisk embed folder) for the refit attack on each target.")] = None,
    refit_ks: Annotated[str, typer.Option(help="Auxiliary pair counts k of the refit attacker (integers of at least 2), comma-separated; all = every pair.")] = "50,200,all",
    n_boot: Annotated[int, typer.Option(min=1, help="Patient-bootstrap resamples per 95% interval (count, at least 1).")] = 1000,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Integer seed (0 to 2^32 - 1) of the holdout split, public choices and bootstraps.")] = 0,
    dp_noise_seed: Annotated[Optional[int], typer.Option(min=0, max=2**62, help="Integer seed (0 to 2^62) of DP sampling and noise for a reproducible run; epsilon is then no formal guarantee (default: fresh OS entropy).")] = None,
    secure_mode: Annotated[bool, typer.Option(help="Draw DP noise from a cryptographically secure generator (Opacus secure_mode; needs torchcsprng).")] = False,
    quiet: QuietOption = False,
    log_file: LogFileOption = None,
) -> None:
    """Train DP heads at several epsilons; audit linkage, probe utility and run the refit attacker on each target."""
    with handle_errors(INTERRUPTED_POINTS_KEPT):
        setup_command_logging(quiet, log_file, ctx)
        import dataclasses

        from linkrisk.mitigate import DPConfig
        from linkrisk.mitigate.dp import INITS
        from linkrisk.mitigate.losses import LOSSES
        from linkrisk.mitigate.run import run_mitigation

        config = DPConfig(delta=delta, epochs=epochs, batch_size=batch_size, sample_rate=sample_rate,
                          max_grad_norm=max_grad_norm, lr=lr, loss=normalise_choice(loss, LOSSES, "--loss"),
                          init=normalise_choice(init, INITS, "--init"), noise_seed=dp_noise_seed, secure_mode=secure_mode,
                          seed=seed)
        parsed = _parse_epsilons(epsilons)
        for value in parsed:
            dataclasses.replace(config, epsilon=value).validate()
        ks = [part.strip() for part in refit_ks.split(",")]
        if any(k != "all" and not (k.isdigit() and int(k) >= 2) for k in ks):
            raise ConfigError(f"invalid --refit-ks {refit_ks!r}; use integers >= 2 or all, comma-separated")
        _check_secure_mode(secure_mode)
        # The refit folder is read only after the whole sweep, so every folder is checked before it starts.
        embed_folder = "a folder written by linkrisk embed"
        _check_folder(train, "--train", embed_folder)
        _check_folder(public, "--public", embed_folder)
        for folder in target or []:
            _check_folder(folder, "--target", embed_folder)
        if refit_aux is not None:
            _check_folder(refit_aux, "--refit-aux", embed_folder)
        run_mitigation(train, public, target or [], out, parsed, config, refit_aux=refit_aux,
                       refit_ks=[k if k == "all" else int(k) for k in ks], holdout=holdout, n_boot=n_boot, seed=seed,
                       progress=not quiet)
        Console(soft_wrap=True).print(f"mitigation written to {out / 'mitigate.json'} and {out / 'report.html'}")


@app.command("report")
def report_command(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="Folder of a finished run holding results.json.")],
    out: Annotated[Optional[Path], typer.Option(help="HTML file to write (default: RUN_DIR/report.html).")] = None,
    quiet: QuietOption = False,
    log_file: LogFileOption = None,
) -> None:
    """Rebuild report.html from RUN_DIR/results.json alone, without re-running any step."""
    with handle_errors():
        setup_command_logging(quiet, log_file, ctx)
        from linkrisk.report import rebuild_report

        written = rebuild_report(run_dir, out=out)
        Console(soft_wrap=True).print(f"report written to {written}")


data_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Inspect datasets given as NAME:PATH (mimic-cxr, chexpert-plus, openi, covid, manifest).")
app.add_typer(data_app, name="data")


def _print_description(summary: dict) -> None:
    console = Console(soft_wrap=True)
    console.print(f"{summary['name']} ({summary['source']}): {summary['images']} images, {summary['studies']} studies, "
                  f"{summary['patients']} patients, {summary['reports']} reports "
                  f"({summary['reports_with_images']} with images, {summary['distinct_report_texts']} distinct texts, "
                  f"{summary['reports_sharing_text']} sharing their text with another)")
    console.print("  views: " + (", ".join(f"{view} {count}" for view, count in summary["views"].items()) or "none"))
    if summary["official_split"]:
        console.print("  official split: " + ", ".join(f"{k} {v}" for k, v in summary["official_split"].items()))
    for label, counts in summary["labels"].items():
        console.print(f"  {label:<27} positive {counts['positive']:>6}  negative {counts['negative']:>6}  "
                      f"uncertain {counts['uncertain']:>6}  blank {counts['blank']:>6}")
    for title in ("skipped", "repairs"):
        for reason, count in summary[title].items():
            console.print(f"  {title}: {reason}: {count}")


@data_app.command("describe")
def data_describe(
    ctx: typer.Context,
    spec: Annotated[str, typer.Argument(metavar="SPEC", help="Dataset as NAME:PATH, e.g. openi:../shared/data/openi.")],
    text_policy: Annotated[Optional[str], typer.Option(help="Report sections forming the text, e.g. findings+impression or impression,fallback=full.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the summary as JSON to this file.")] = None,
    quiet: QuietOption = False,
    log_file: LogFileOption = None,
) -> None:
    """Load a dataset and print its summary: counts, views, label prevalence, skipped and repaired records."""
    with handle_errors():
        setup_command_logging(quiet, log_file, ctx)
        from linkrisk._io import write_json
        from linkrisk.data.registry import load_dataset
        from linkrisk.data.sections import TextPolicy

        policy = TextPolicy.parse(text_policy) if text_policy else None
        summary = load_dataset(spec, policy).describe()
        _print_description(summary)
        if json_out:
            write_json(json_out, summary)


@app.command()
def version() -> None:
    """Print the linkrisk version."""
    typer.echo(__version__)


# The run and config commands register themselves on ``app``.
from linkrisk import cli_config  # noqa: E402,F401


def main() -> None:
    app(prog_name="linkrisk")


if __name__ == "__main__":
    # Under ``python -m linkrisk.cli`` this file runs as __main__, while cli_config registers its commands on the
    # app of the imported linkrisk.cli, so run that module's main.
    from linkrisk.cli import main as package_main

    sys.exit(package_main())
