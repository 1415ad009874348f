"""The command line: every option of every command, exit statuses, --quiet, --log-file and linkrisk report.

Inputs are small cohorts written here with numpy (a Parquet manifest with
embeddings, a folder of precomputed features and heads, and the embed
folders made from them), plus the real shared data for ``data describe``.
``INVOCATIONS`` lists the command lines; the invocation test runs each one,
and the coverage test checks that together they pass every option that
``--help`` lists.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import logging
import re
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer.main
from torch import nn
from typer.testing import CliRunner

import linkrisk.report
from linkrisk import cli
from linkrisk._logging import configure_logging, reset_logging
from linkrisk.cli import app
from linkrisk.errors import ConfigError, InputError, LinkriskError

LINKRISK = [sys.executable, "-m", "linkrisk.cli"]
HAS_TORCHCSPRNG = importlib.util.find_spec("torchcsprng") is not None

# NOTE: `run` and the `config` group are walked like every other command, but their options are left out of
# the coverage check here: tests/test_config.py tests them.
OPTIONS_TESTED_ELSEWHERE = {("run",), ("config",)}


@dataclasses.dataclass(frozen=True)
class Invocation:
    """One command line, its exit status and a regular expression its output must match.

    ``args`` may name the inputs as ``{audit}`` (an embed folder), ``{corrupt}``
    (the same with a truncated image.npy), ``{manifest}``, ``{weights}``
    (precomputed features), ``{train}``, ``{public}``, ``{data}`` (the
    shared data), ``{missing}`` (a path that does not exist) and ``{tmp}``
    (the test's own folder).
    """

    name: str
    args: tuple[str, ...]
    exit_code: int
    output: str | None = None


def _case(name: str, line: str, exit_code: int, output: str | None = None) -> Invocation:
    return Invocation(name, tuple(line.split()), exit_code, output)


_SECURE_MODE = (1, "data folder .* not found") if HAS_TORCHCSPRNG else (2, "--secure-mode needs the torchcsprng")
_SECURE_MODE_MITIGATE = (1, "--train .* folder not found") if HAS_TORCHCSPRNG else \
    (2, "--secure-mode needs the torchcsprng")
_EMBED = "embed --model precomputed --weights {weights} --dataset manifest:{manifest}"
_MITIGATE = "mitigate --train {train} --public {public} --out {tmp}/m"

INVOCATIONS = [
    # demo: a real run takes minutes, so every case stops at an input check before the first stage.
    _case("demo-missing-data", "demo --data {missing} --out {tmp}/o --cache-dir {tmp}/c --quiet "
          "--log-file {tmp}/demo.log", 1, "error: data folder .*missing not found"),
    _case("demo-epsilon", "demo --epsilon 1000", 2, r"epsilon must be in \(0, 100\]"),
    _case("demo-delta", "demo --delta 2", 2, r"delta must be in \(0, 1\)"),
    _case("demo-noise-seed", "demo --dp-noise-seed -1", 2, "--dp-noise-seed"),
    _case("demo-secure-mode", "demo --secure-mode --data {missing}", *_SECURE_MODE),
    _case("demo-image-encoder", "demo --image-encoder vit", 2,
          "invalid --image-encoder 'vit'; valid values: randconv, histdct"),
    _case("demo-text-weights", "demo --data {data} --text-weights {missing}", 1, "--text-weights .* folder not found"),
    _case("demo-seed", "demo --seed -1", 2, "--seed"),
    _case("demo-n-boot", "demo --n-boot 0", 2, "--n-boot"),
    _case("demo-flags-off", "demo --no-secure-mode --no-quiet --data {missing}", 1, "data folder"),
    _case("demo-unknown-option", "demo --epsilons 1", 2, "No such option"),

    # audit: real runs on the small embed folder.
    _case("audit-pools", "audit {audit} --pools 5,full --ks 1,3 --n-boot 20 --seed 1 --device cpu "
          "--json {tmp}/audit.json --quiet --log-file {tmp}/audit.log", 0, r"N=\s+5 K=\s+1"),
    _case("audit-directions", "audit {audit} --direction report-to-image --level patient --image-level study-mean "
          "--ties optimistic --pools 5,full --n-boot 20 --no-quiet", 0, "report to image, patient level"),
    _case("audit-label-matched", "audit {audit} --negatives label-matched --label-policy ignore "
          "--fallback nearest-label --pools 5 --ks 1 --n-boot 20", 0, "label policy ignore"),
    _case("audit-monte-carlo", "audit {audit} --monte-carlo 5 --pools 5 --ks 1 --n-boot 20", 0, "Monte Carlo N="),
    _case("audit-permutations", "audit {audit} --permutations 19 --pools 5 --ks 1 --n-boot 20", 0,
          r"permutation test \(19 patient permutations\): mean normalised rank p = "),
    _case("audit-match", "audit {audit} --match labels,Edema,view --pools 5 --ks 1 --n-boot 20", 0,
          "attribute-matched pools on labels, Edema, view"),
    _case("audit-match-unknown", "audit {audit} --match nosuch --pools 5 --ks 1 --n-boot 20", 2,
          "unknown attribute column 'nosuch'"),
    _case("audit-merge", "audit {audit} --merge-identical --pools 5 --ks 1 --n-boot 20", 0, "Recall"),
    _case("audit-no-merge", "audit {audit} --no-merge-identical --pools 5 --ks 1 --n-boot 20", 0, "Recall"),
    _case("audit-manifest", "audit manifest:{manifest} --pools 5 --ks 1 --n-boot 20", 0, "48 queries"),
    _case("audit-missing", "audit {missing}", 1, "image.npy: not found"),
    _case("audit-corrupt", "audit {corrupt}", 1, "image.npy: not a readable numeric .npy array"),
    _case("audit-json-folder", "audit {audit} --pools 5 --ks 1 --n-boot 20 --json {tmp}", 1, "is a folder"),
    _case("audit-pools-bad", "audit {audit} --pools 1", 2, "invalid pool size '1' in --pools"),
    _case("audit-ks-bad", "audit {audit} --ks 0", 2, "invalid --ks '0'"),
    _case("audit-ties-bad", "audit {audit} --ties first", 2, "invalid --ties 'first'"),
    _case("audit-device-bad", "audit {audit} --device abacus", 2, "invalid --device 'abacus'"),
    _case("audit-monte-carlo-bad", "audit {audit} --monte-carlo -1", 2, "--monte-carlo"),
    _case("audit-permutations-bad", "audit {audit} --permutations -1", 2, "--permutations"),
    _case("audit-precision", "audit {audit} --precision bf16 --block-size 7 --engine local --pools 5 --ks 1 "
          "--n-boot 20", 0, r"N=\s+5 K=\s+1"),
    _case("audit-ray", "audit {audit} --engine ray --address local --pools 5 --ks 1 --n-boot 20", 0,
          r"N=\s+5 K=\s+1"),
    _case("audit-precision-bad", "audit {audit} --precision fp8", 2, "invalid --precision 'fp8'"),
    _case("audit-block-size-bad", "audit {audit} --block-size 0", 2, "--block-size"),
    _case("audit-engine-bad", "audit {audit} --engine spark", 2, "invalid --engine 'spark'; valid values: local, ray"),
    _case("audit-address-local", "audit {audit} --address auto", 2, "pass --engine ray"),
    _case("audit-unknown-option", "audit {audit} --pool 5", 2, "No such option"),
    _case("audit-no-argument", "audit", 2, "Missing argument"),

    # embed: the precomputed adapter runs the whole command without a model's forward pass.
    _case("embed-options", _EMBED + " --out {tmp}/e --device cpu --precision fp32 --batch-size 4 "
          "--text-batch-size 4 --chunk-size 8 --workers 0 --no-fast-decode --no-allow-download --quiet "
          "--log-file {tmp}/embed.log", 0, "48 images and 24 reports embedded"),
    _case("embed-flags-on", _EMBED + " --out {tmp}/e --fast-decode --allow-download --no-quiet", 0,
          "audit with: linkrisk audit"),
    _case("embed-text-policy", _EMBED + " --out {tmp}/e --text-policy bogus", 2, "invalid report sections"),
    _case("embed-text-policy-no-sections", _EMBED + " --out {tmp}/e --text-policy impression", 2,
          "has no report sections"),
    _case("embed-precision", _EMBED + " --out {tmp}/e --precision bf16", 2, "autocast for GPUs"),
    _case("embed-device", _EMBED + " --out {tmp}/e --device abacus", 2, "invalid --device 'abacus'"),
    _case("embed-batch-size", _EMBED + " --out {tmp}/e --batch-size 0", 2, "--batch-size"),
    _case("embed-text-batch-size", _EMBED + " --out {tmp}/e --text-batch-size 0", 2, "--text-batch-size"),
    _case("embed-chunk-size", _EMBED + " --out {tmp}/e --chunk-size 0", 2, "--chunk-size"),
    _case("embed-workers", _EMBED + " --out {tmp}/e --workers -1", 2, "--workers"),
    _case("embed-ray", _EMBED + " --out {tmp}/e --engine ray --address local --actors 1", 0,
          "48 images and 24 reports embedded"),
    _case("embed-engine-bad", _EMBED + " --out {tmp}/e --engine spark", 2, "invalid --engine 'spark'"),
    _case("embed-address-local", _EMBED + " --out {tmp}/e --address auto", 2, "pass --engine ray"),
    _case("embed-actors-bad", _EMBED + " --out {tmp}/e --engine ray --actors -1", 2, "--actors"),
    _case("embed-model", "embed --model medclip --weights {weights} --dataset manifest:{manifest} --out {tmp}/e", 2,
          "unknown model 'medclip'"),
    _case("embed-weights-missing", "embed --model precomputed --weights {missing} --dataset manifest:{manifest} "
          "--out {tmp}/e", 1, "not a folder"),
    _case("embed-dataset-missing", "embed --model precomputed --weights {weights} --dataset manifest:{missing} "
          "--out {tmp}/e", 1, "not found"),
    _case("embed-missing-option", "embed --model precomputed --weights {weights} --out {tmp}/e", 2,
          "Missing option '--dataset'"),

    # mitigate: two real sweeps on the small embed folders (one epoch); the rest stops at the option checks.
    _case("mitigate-run", _MITIGATE + " --target {public} --epsilons 1,inf --delta 1e-3 --loss public-bank "
          "--init original --epochs 1 --batch-size 8 --max-grad-norm 1.0 --lr 0.05 --holdout 0.25 --n-boot 10 "
          "--seed 1 --dp-noise-seed 3 --no-secure-mode --quiet --log-file {tmp}/mitigate.log", 0,
          "mitigation written to"),
    _case("mitigate-sample-rate", _MITIGATE + " --epsilons 2 --loss in-batch --init public --epochs 1 "
          "--sample-rate 0.5 --n-boot 10 --dp-noise-seed 5 --no-quiet", 0, "mitigation written to"),
    _case("mitigate-epsilons", _MITIGATE + " --epsilons 0.5,-1", 2, "invalid epsilon '-1' in --epsilons"),
    _case("mitigate-delta", _MITIGATE + " --delta 2", 2, r"delta must be in \(0, 1\)"),
    _case("mitigate-loss", _MITIGATE + " --loss triplet", 2, "invalid --loss 'triplet'"),
    _case("mitigate-init", _MITIGATE + " --init random", 2, "invalid --init 'random'"),
    _case("mitigate-epochs", _MITIGATE + " --epochs 0", 2, "--epochs"),
    _case("mitigate-batch-size", _MITIGATE + " --batch-size 0", 2, "--batch-size"),
    _case("mitigate-sample-rate-bad", _MITIGATE + " --sample-rate 1.5", 2, "Invalid value for '--sample-rate'"),
    _case("mitigate-max-grad-norm", _MITIGATE + " --max-grad-norm 0", 2, "Invalid value for '--max-grad-norm'"),
    _case("mitigate-lr", _MITIGATE + " --lr -1", 2, "Invalid value for '--lr'"),
    _case("mitigate-holdout", _MITIGATE + " --holdout 1", 2, "Invalid value for '--holdout'"),
    _case("mitigate-refit-ks", _MITIGATE + " --refit-ks 1", 2, "invalid --refit-ks '1'"),
    _case("mitigate-refit-aux", _MITIGATE + " --refit-aux {missing}", 1, "--refit-aux .* folder not found"),
    _case("mitigate-target", _MITIGATE + " --target {missing}", 1, "--target .* folder not found"),
    _case("mitigate-train", "mitigate --train {missing} --public {public} --out {tmp}/m", 1,
          "--train .* folder not found"),
    _case("mitigate-seeds", _MITIGATE + " --seed -1 --dp-noise-seed -1 --n-boot 0", 2, "Invalid value"),
    _case("mitigate-secure-mode", "mitigate --train {missing} --public {public} --out {tmp}/m --secure-mode",
          *_SECURE_MODE_MITIGATE),

    # report: rebuild_report is replaced by a recording fake here; test_report_rebuilds_demo_report runs the real one.
    _case("report-options", "report {tmp}/run --out {tmp}/rebuilt.html --quiet --log-file {tmp}/report.log", 0,
          "report written to .*rebuilt.html"),
    _case("report-default-out", "report {tmp}/run --no-quiet", 0, "report written to .*report.html"),
    _case("report-no-argument", "report", 2, "Missing argument"),

    # data describe on the small manifest and on the real Open-i folder.
    _case("describe-manifest", "data describe manifest:{manifest} --json {tmp}/summary.json --quiet "
          "--log-file {tmp}/describe.log", 0, "48 images, 24 studies, 24 patients"),
    _case("describe-openi", "data describe openi:{data}/openi --text-policy impression --no-quiet", 0,
          r"openi \(.*openi\): 39 images, 39 studies"),
    _case("describe-text-policy", "data describe manifest:{manifest} --text-policy impression", 2,
          "has no report sections"),
    _case("describe-missing", "data describe covid:{missing}", 1, "metadata.csv: not found"),

    _case("version", "version", 0, r"^\d+\.\d+\.\d+"),
    _case("no-command", "audits", 2, "No such command"),
]


# Small cohorts


def _write_cohort(root: Path, seed: int, prefix: str) -> tuple[Path, Path]:
    """Write a manifest and a precomputed-features folder of 24 patients, each with one study of two images."""
    from linkrisk.models.head_io import save_heads

    rng = np.random.default_rng(seed)
    n_reports, feature_dim, embed_dim = 24, 16, 8
    report_features = rng.normal(size=(n_reports, feature_dim)).astype(np.float32)
    report_of_image = np.repeat(np.arange(n_reports), 2)
    image_features = (report_features[report_of_image]
                      + 0.5 * rng.normal(size=(len(report_of_image), feature_dim))).astype(np.float32)
    image_ids = [f"{prefix}-image-{i}" for i in range(len(report_of_image))]
    report_ids = [f"{prefix}-report-{r}" for r in range(n_reports)]
    labels = {name: rng.integers(0, 2, n_reports).astype(float) for name in ("Edema", "Cardiomegaly")}

    root.mkdir(parents=True)
    manifest = pd.DataFrame({
        "image_id": image_ids,
        "patient_id": [f"{prefix}-patient-{r}" for r in report_of_image],
        "report_id": [report_ids[r] for r in report_of_image],
        "report_text": [f"synthetic text {r}" for r in report_of_image],
        "image_embedding": list(image_features),
        "report_embedding": list(report_features[report_of_image]),
        **{name: values[report_of_image] for name, values in labels.items()},
    })
    manifest.to_parquet(root / "manifest.parquet")

    weights = root / "weights"
    weights.mkdir()
    pd.DataFrame({"image_id": image_ids}).to_parquet(weights / "images.parquet")
    pd.DataFrame({"report_id": report_ids}).to_parquet(weights / "reports.parquet")
    np.save(weights / "image_features.npy", image_features)
    np.save(weights / "report_features.npy", report_features)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        save_heads(weights, nn.Linear(feature_dim, embed_dim), nn.Linear(feature_dim, embed_dim))
    return root / "manifest.parquet", weights


def _embed(manifest: Path, weights: Path, out: Path) -> Path:
    from linkrisk.data.registry import load_dataset
    from linkrisk.models.adapters import load_adapter
    from linkrisk.models.embed import EmbedConfig, embed_cohort, hash_weights

    adapter = load_adapter("precomputed", weights)
    embed_cohort(adapter, load_dataset(f"manifest:{manifest}"), out, EmbedConfig(workers=0, progress=False),
                 {"model": "precomputed", "weights_sha256": hash_weights(weights)})
    return out


@pytest.fixture(scope="module")
def inputs(data_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli-inputs")
    manifest, weights = _write_cohort(root / "train", seed=0, prefix="train")
    public_manifest, public_weights = _write_cohort(root / "public", seed=1, prefix="public")
    train = _embed(manifest, weights, root / "train-embedded")
    public = _embed(public_manifest, public_weights, root / "public-embedded")
    corrupt = root / "corrupt"
    shutil.copytree(train, corrupt)
    content = (corrupt / "image.npy").read_bytes()
    (corrupt / "image.npy").write_bytes(content[: len(content) // 2])
    return {"audit": str(train), "corrupt": str(corrupt), "manifest": str(manifest), "weights": str(weights),
            "train": str(train), "public": str(public), "data": str(data_dir)}


@pytest.fixture(autouse=True)
def _restore_process_state(monkeypatch):
    """Undo what a command changes in this process: logging handlers and the offline variables of embed."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    yield
    reset_logging()


@pytest.fixture
def fake_rebuild(monkeypatch):
    """Replace linkrisk.report.rebuild_report with a fake that records its calls and writes nothing."""
    calls = []

    def rebuild_report(run_dir, out=None):
        calls.append((Path(run_dir), out))
        return Path(out) if out is not None else Path(run_dir) / "report.html"

    monkeypatch.setattr(linkrisk.report, "rebuild_report", rebuild_report)
    return calls


def _fill(args: tuple[str, ...], inputs: dict[str, str], tmp: Path) -> list[str]:
    names = {**inputs, "tmp": str(tmp), "missing": str(tmp / "missing")}
    return [arg.format(**names) for arg in args]


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, prog_name="linkrisk")


# Invocations and option coverage


@pytest.mark.parametrize("case", INVOCATIONS, ids=[case.name for case in INVOCATIONS])
def test_invocation(case, inputs, fake_rebuild, tmp_path):
    (tmp_path / "run").mkdir()
    result = _invoke(_fill(case.args, inputs, tmp_path))
    output = " ".join(result.output.split())
    assert result.exit_code == case.exit_code, result.output
    if case.output:
        assert re.search(case.output, output), output
    assert "Traceback" not in result.output


def _commands(command, path: tuple[str, ...] = ()):
    """Yield ``(path, command)`` for every command below a click group, groups included."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def _command_path(args: tuple[str, ...]) -> tuple[tuple[str, ...], list[str]]:
    """Split a command line into the command path and the rest, following the click tree."""
    command, path = typer.main.get_command(app), []
    rest = list(args)
    while rest and rest[0] in getattr(command, "commands", {}):
        command = command.commands[rest[0]]
        path.append(rest.pop(0))
    return tuple(path), rest


def _exercised_options() -> dict[tuple[str, ...], set[str]]:
    exercised: dict[tuple[str, ...], set[str]] = {}
    for case in INVOCATIONS:
        path, rest = _command_path(case.args)
        exercised.setdefault(path, set()).update(arg.split("=")[0] for arg in rest if arg.startswith("--"))
    return exercised


def _option_names(command) -> set[str]:
    return {name for param in command.params if param.param_type_name == "option"
            for name in (*param.opts, *param.secondary_opts)}


def test_every_option_is_exercised():
    exercised = _exercised_options()
    walked = dict(_commands(typer.main.get_command(app)))
    assert {("demo",), ("audit",), ("embed",), ("mitigate",), ("report",), ("data", "describe")} <= set(walked)
    missing = {}
    for path, command in walked.items():
        if any(path[: len(skip)] == skip for skip in OPTIONS_TESTED_ELSEWHERE):
            continue
        left = _option_names(command) - exercised.get(path, set())
        if left:
            missing[" ".join(path)] = sorted(left)
    assert not missing, f"options no invocation passes: {missing}"


def test_invocations_name_real_options():
    walked = dict(_commands(typer.main.get_command(app)))
    unknown_on_purpose = {"--pool", "--epsilons"}  # the unknown-option cases
    for path, options in _exercised_options().items():
        assert path in walked, path
        unknown = options - _option_names(walked[path]) - unknown_on_purpose
        assert not unknown, (path, unknown)


def test_quiet_and_log_file_on_every_command():
    walked = dict(_commands(typer.main.get_command(app)))
    for path in [("demo",), ("audit",), ("embed",), ("mitigate",), ("report",), ("data", "describe")]:
        names = _option_names(walked[path])
        assert {"--quiet", "--log-file"} <= names, path


def test_every_option_has_help():
    for path, command in _commands(typer.main.get_command(app)):
        if any(path[: len(skip)] == skip for skip in OPTIONS_TESTED_ELSEWHERE):
            continue
        for param in command.params:
            assert (getattr(param, "help", None) or "").strip(), (path, param.name)


@pytest.mark.parametrize("path", [(), ("demo",), ("audit",), ("embed",), ("mitigate",), ("report",), ("data",),
                                  ("data", "describe")], ids=lambda path: " ".join(path) or "linkrisk")
def test_help_exits_zero(path):
    result = _invoke([*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_help_lists_exit_statuses():
    output = " ".join(_invoke(["--help"]).output.split())
    assert "Exit status:" in output
    assert "0 success" in output
    assert "1 failure" in output
    assert "2 usage error" in output
    assert "130 interrupted" in output


# Exit statuses of a real process


@pytest.mark.parametrize("line, exit_code", [
    ("audit {audit} --pools 5 --ks 1 --n-boot 20", 0),
    ("audit {missing}", 1),
    ("audit {corrupt}", 1),
    ("audit {audit} --ties first", 2),
    ("audit {audit} --n-boot 0", 2),
    ("audit {audit} --no-such-option", 2),
], ids=["ok", "missing-folder", "corrupt-input", "bad-value", "out-of-range", "unknown-option"])
def test_process_exit_status(inputs, tmp_path, line, exit_code):
    result = subprocess.run([*LINKRISK, *_fill(tuple(line.split()), inputs, tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == exit_code, result.stderr
    assert "Traceback" not in result.stderr
    if exit_code == 1:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: ")


def test_interrupt_exits_130(inputs, tmp_path, monkeypatch):
    import linkrisk.models.embed

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(linkrisk.models.embed, "embed_cohort", interrupted)
    result = _invoke(_fill(tuple(_EMBED.split()) + ("--out", "{tmp}/e", "--log-file", "{tmp}/log"), inputs,
                           tmp_path))
    assert result.exit_code == 130
    assert "error: interrupted; finished cache chunks are kept" in " ".join(result.output.split())
    assert "exit status 130: interrupted" in (tmp_path / "log").read_text()


def test_interrupt_without_resume_says_so(inputs, tmp_path, monkeypatch):
    import linkrisk.audit.embeddings

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(linkrisk.audit.embeddings, "audit_folder", interrupted)
    result = _invoke(["audit", inputs["audit"]])
    assert result.exit_code == 130
    assert "error: interrupted; nothing was written" in result.output


def test_full_disk_keeps_its_message(inputs, tmp_path, monkeypatch):
    import linkrisk._io

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(linkrisk._io, "write_json", full)
    result = _invoke(["audit", inputs["audit"], "--pools", "5", "--ks", "1", "--n-boot", "20",
                      "--json", str(tmp_path / "a.json")])
    output = " ".join(result.output.split())
    assert result.exit_code == 1
    assert "a.json: No space left on device; free disk space and run the same command again" in output


def test_unexpected_error_keeps_traceback(inputs, monkeypatch):
    import linkrisk.audit.embeddings

    def broken(*args, **kwargs):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(linkrisk.audit.embeddings, "audit_folder", broken)
    result = _invoke(["audit", inputs["audit"]])
    assert result.exit_code == 1
    assert isinstance(result.exception, ZeroDivisionError)


@pytest.mark.parametrize("error, exit_code", [
    (ConfigError, 2), (InputError, 1), (LinkriskError, 1), (OSError, 1), (EOFError, 1),
], ids=lambda value: value.__name__ if isinstance(value, type) else str(value))
def test_handle_errors_exit_codes(error, exit_code, capsys):
    with pytest.raises(typer.Exit) as raised:
        with cli.handle_errors():
            raise error("something is wrong")
    assert raised.value.exit_code == exit_code
    assert "error: something is wrong" in capsys.readouterr().err


# --quiet and --log-file


def test_quiet_hides_info_lines(inputs):
    loud = _invoke(["audit", inputs["audit"], "--pools", "5", "--ks", "1", "--n-boot", "20"])
    quiet = _invoke(["audit", inputs["audit"], "--pools", "5", "--ks", "1", "--n-boot", "20", "--quiet"])
    assert "audit started" in loud.output
    assert "audit started" not in quiet.output
    assert "Recall" in quiet.output


def test_log_file_gets_full_log_with_quiet(inputs, tmp_path):
    log = tmp_path / "logs" / "linkrisk.log"
    args = ["audit", inputs["audit"], "--pools", "5", "--ks", "1", "--n-boot", "20", "--quiet", "--log-file", str(log)]
    assert _invoke(args).exit_code == 0
    assert _invoke(args).exit_code == 0
    text = log.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) ", line) for line in lines), text
    assert len(re.findall(r"started \(pid \d+\): linkrisk audit with", text)) == 2  # appended, not overwritten
    assert "INFO     linkrisk: audit started: image_to_report" in text
    assert text.count("finished in") >= 2
    assert "\x1b[" not in text
    assert "[bold" not in text


def test_log_file_keeps_existing_mode(inputs, tmp_path):
    log = tmp_path / "shared.log"
    log.write_text("")
    log.chmod(0o640)
    assert _invoke(["audit", inputs["audit"], "--pools", "5", "--ks", "1", "--n-boot", "20",
                    "--log-file", str(log)]).exit_code == 0
    assert stat.S_IMODE(log.stat().st_mode) == 0o640
    assert "audit started" in log.read_text()


def test_log_file_records_the_error(inputs, tmp_path):
    log = tmp_path / "error.log"
    result = _invoke(["audit", str(tmp_path / "nowhere"), "--quiet", "--log-file", str(log)])
    assert result.exit_code == 1
    text = log.read_text()
    assert re.search(r"ERROR +linkrisk: exit status 1: .*nowhere/image.npy: not found", text), text
    assert "finished in" not in text


def test_log_file_that_cannot_be_opened(inputs, tmp_path):
    result = _invoke(["audit", inputs["audit"], "--log-file", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.startswith("error: ")
    assert str(tmp_path) in " ".join(result.output.split())


def test_warnings_reach_log_file(tmp_path):
    log = tmp_path / "warnings.log"
    configure_logging(quiet=True, log_file=log)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a test warning", RuntimeWarning, stacklevel=1)
    logging.getLogger("linkrisk.test").info("an info line")
    text = log.read_text()
    assert "WARNING  py.warnings:" in text
    assert "RuntimeWarning: a test warning" in text
    assert "INFO     linkrisk.test: an info line" in text


def test_configure_logging_twice_replaces_handlers(tmp_path):
    configure_logging(quiet=False, log_file=tmp_path / "first.log")
    configure_logging(quiet=True, log_file=tmp_path / "second.log")
    logging.getLogger("linkrisk").info("only in the second")
    assert "only in the second" not in (tmp_path / "first.log").read_text()
    assert "only in the second" in (tmp_path / "second.log").read_text()
    owned = [h for h in logging.getLogger().handlers if getattr(h, "_linkrisk_handler", False)]
    assert len(owned) == 2


def test_log_files_hold_no_report_text(data_dir, covid, openi, tmp_path):
    log = tmp_path / "real.log"
    for spec in (f"openi:{data_dir / 'openi'}", f"covid:{data_dir / 'covid-chestxray'}"):
        assert _invoke(["data", "describe", spec, "--log-file", str(log)]).exit_code == 0
    content = log.read_bytes()
    assert b"openi: xml layout" in content
    texts = [t for cohort in (covid, openi) for t in cohort.reports["text"] if len(t) >= 30]
    assert texts
    assert not any(t[:30].encode() in content for t in texts)


def test_embed_log_holds_no_report_text(inputs, tmp_path):
    log = tmp_path / "embed.log"
    result = _invoke(_fill(tuple(_EMBED.split()) + ("--out", "{tmp}/e", "--log-file", str(log)), inputs, tmp_path))
    assert result.exit_code == 0, result.output
    assert "synthetic text" not in log.read_text()


# linkrisk report


def test_report_passes_arguments(fake_rebuild, tmp_path):
    result = _invoke(["report", str(tmp_path), "--out", str(tmp_path / "x.html")])
    assert result.exit_code == 0, result.output
    assert fake_rebuild == [(tmp_path, tmp_path / "x.html")]
    result = _invoke(["report", str(tmp_path)])
    assert fake_rebuild[-1] == (tmp_path, None)
    assert f"report written to {tmp_path / 'report.html'}" in " ".join(result.output.split())


def test_report_rebuilds_demo_report(demo_run, tmp_path):
    out, _ = demo_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(out / "results.json", run_dir / "results.json")
    result = _invoke(["report", str(run_dir), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (run_dir / "report.html").is_file()
    assert f"report written to {run_dir / 'report.html'}" in " ".join(result.output.split())
    result = _invoke(["report", str(run_dir), "--out", str(tmp_path / "elsewhere.html")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "elsewhere.html").is_file()


def test_report_without_results_fails(tmp_path):
    result = _invoke(["report", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ")
    assert "results.json" in result.output
