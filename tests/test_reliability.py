"""Sensitive outputs and reliability: owner-only modes, offline runs, no report text, determinism, full disk."""

from __future__ import annotations

import contextlib
import errno
import html
import json
import math
import os
import pathlib
import re
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from linkrisk.cli import app
from linkrisk.provenance import strip_timing

# Demo bootstraps of the extra run here: enough to run every stage, few enough to keep it short.
OFFLINE_N_BOOT = 50

# Report sentences shorter than this are too generic ("No acute disease.") to prove a leak.
MIN_SENTENCE_CHARS = 30

# Words of a sentence that the scan looks up before it compares the rest.
KEY_WORDS = 3


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, prog_name="linkrisk")


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    """Run the block under ``mask``, so that a permissive umask cannot hide a missing mode."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _block_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple]]:
    """Make every socket connection and name lookup raise; return the list that records each attempt."""
    attempts: list[tuple[str, tuple]] = []

    def blocked(name: str):
        def raise_blocked(*args, **kwargs):
            attempts.append((name, args))
            raise OSError(errno.ENETUNREACH, f"network blocked by the test ({name})")

        return raise_blocked

    monkeypatch.setattr(socket.socket, "connect", blocked("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", blocked("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", blocked("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", blocked("socket.getaddrinfo"))
    return attempts


@pytest.fixture(scope="module")
def offline_run(data_dir, cache_dir, tmp_path_factory):
    """Run the demo in-process with the network blocked and a log file, and return its paths and records.

    The output and log folders do not exist beforehand, so linkrisk creates them. ``base`` exists with
    mode 0755 and must keep it.
    """
    from linkrisk._logging import configure_logging, reset_logging
    from linkrisk.pipeline import DemoConfig, run_demo

    base = tmp_path_factory.mktemp("offline")
    base.chmod(0o755)
    out = base / "runs" / "demo"
    log = base / "logs" / "demo.log"
    with pytest.MonkeyPatch.context() as monkeypatch, _umask(0o022):
        attempts = _block_network(monkeypatch)
        configure_logging(quiet=True, log_file=log)
        try:
            results = run_demo(DemoConfig(data_dir=data_dir, out_dir=out, cache_dir=cache_dir,
                                          n_boot=OFFLINE_N_BOOT, progress=False))
        finally:
            reset_logging()
    return {"base": base, "out": out, "log": log, "attempts": attempts, "results": results}


# Owner-only modes


def _modes_other_than_private(root: Path) -> list[str]:
    """Return ``mode path`` for every folder under ``root`` (itself included) not 0700 and every file not 0600."""
    wrong = []
    for folder, subfolders, files in os.walk(root):
        for path in [Path(folder)] + [Path(folder) / name for name in subfolders + files]:
            st = path.lstat()
            expected = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)) or stat.S_IMODE(st.st_mode) != expected:
                wrong.append(f"{stat.filemode(st.st_mode)} {path}")
    return sorted(set(wrong))


def test_demo_output_is_owner_only(demo_run, cache_dir):
    out, _ = demo_run
    assert (out / "results.json").is_file()
    assert _modes_other_than_private(out) == []
    assert _modes_other_than_private(cache_dir / "features") == []


def test_created_folders_are_owner_only(offline_run):
    """Folders that linkrisk creates (out and its missing parents) get 0700; an existing parent keeps its mode."""
    base = offline_run["base"]
    assert _modes_other_than_private(base / "runs") == []
    assert _modes_other_than_private(base / "logs") == []
    assert stat.S_IMODE(base.stat().st_mode) == 0o755


def test_embed_output_is_owner_only(demo_run, data_dir, tmp_path):
    """``linkrisk embed`` (precomputed adapter on the demo's Open-i embeddings) writes owner-only files."""
    demo_out, _ = demo_run
    tmp_path.chmod(0o755)
    out = tmp_path / "runs" / "embed"
    log = tmp_path / "logs" / "embed.log"
    with _umask(0o022):
        result = _invoke(["embed", "--model", "precomputed", "--weights",
                          str(demo_out / "embeddings" / "openi" / "original"), "--dataset",
                          f"openi:{data_dir / 'openi'}", "--out", str(out), "--log-file", str(log), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (out / "embed.json").is_file()
    assert log.is_file()
    assert _modes_other_than_private(tmp_path / "logs") == []
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755
    assert _modes_other_than_private(tmp_path / "runs") == []


def test_log_file_is_owner_only(data_dir, tmp_path):
    tmp_path.chmod(0o755)
    log = tmp_path / "new" / "logs" / "describe.log"
    with _umask(0o022):
        result = _invoke(["data", "describe", f"covid:{data_dir / 'covid-chestxray'}", "--log-file", str(log),
                          "--quiet"])
    assert result.exit_code == 0, result.output
    assert log.stat().st_size > 0
    assert _modes_other_than_private(tmp_path / "new") == []
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


def test_atomic_write_mode_survives_recreating_writer(tmp_path):
    """A writer that deletes and recreates the temp file (default mode 0644 here) still leaves a 0600 file."""
    from linkrisk._io import atomic_write

    def recreate(tmp: Path) -> None:
        tmp.unlink()
        tmp.write_text("x")

    with _umask(0o022):
        atomic_write(tmp_path / "a" / "b.txt", recreate)
    assert stat.S_IMODE((tmp_path / "a" / "b.txt").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700


# Offline by default


def test_demo_runs_offline(offline_run):
    assert offline_run["attempts"] == []
    assert (offline_run["out"] / "results.json").is_file()
    assert (offline_run["out"] / "report.html").is_file()
    assert offline_run["results"]["runs"]


def test_hub_weights_need_allow_download(data_dir, tmp_path, monkeypatch):
    # The embed command sets these for the rest of the process; monkeypatch restores them afterwards.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    attempts = _block_network(monkeypatch)
    result = _invoke(["embed", "--model", "open-clip", "--weights", "hf-hub:org/name", "--dataset",
                      f"covid:{data_dir / 'covid-chestxray'}", "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "pass --allow-download" in " ".join(result.stderr.split())
    assert attempts == []
    assert not (tmp_path / "out").exists()


# No report text in any output


def _report_sentences(*cohorts) -> set[tuple[str, ...]]:
    """Return the report sentences of at least MIN_SENTENCE_CHARS characters, each as its case-folded words."""
    sentences = set()
    for cohort in cohorts:
        for text in cohort.reports["text"].dropna():
            for sentence in re.split(r"(?<=[.!?])\s+|\n+", str(text)):
                words = _words(sentence)
                if len(" ".join(sentence.split())) >= MIN_SENTENCE_CHARS and len(words) >= KEY_WORDS:
                    sentences.add(words)
    return sentences


def _words(text: str) -> tuple[str, ...]:
    # Comparing words, not characters, makes the scan blind to the whitespace, punctuation and markup between them.
    return tuple(re.findall(r"\w+", text.casefold()))


def _sentences_in(words: tuple[str, ...], sentences: set[tuple[str, ...]]) -> set[tuple[str, ...]]:
    """Return the sentences that occur as consecutive words in ``words``, in one pass with their first words as keys."""
    by_start: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for sentence in sentences:
        by_start.setdefault(sentence[:KEY_WORDS], []).append(sentence)
    found = set()
    for i in range(len(words) - KEY_WORDS + 1):
        for sentence in by_start.get(words[i:i + KEY_WORDS], []):
            if words[i:i + len(sentence)] == sentence:
                found.add(sentence)
    return found


def _json_strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _json_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_strings(item)


def _text_views(path: Path) -> Iterator[str]:
    """Yield the file's bytes decoded as UTF-8 and, per format, the text that escaping or compression hides."""
    raw = path.read_bytes().decode("utf-8", errors="ignore")
    yield raw
    yield html.unescape(raw)
    if path.suffix == ".json":
        yield "\n".join(_json_strings(json.loads(raw)))
    if path.suffix == ".parquet":
        table = pd.read_parquet(path)
        yield "\n".join(map(str, table.columns))
        for column in table.columns:
            if not pd.api.types.is_numeric_dtype(table[column]):
                yield "\n".join(table[column].dropna().astype(str))
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as stored:
            for name in stored.files:
                if stored[name].dtype.kind in "US":
                    yield "\n".join(map(str, stored[name].ravel()))


def _files_with_report_text(roots: list[Path], sentences: set[tuple[str, ...]]) -> list[str]:
    """Return ``path: sentence`` for every file under ``roots`` (files or folders) that contains a sentence."""
    files = []
    for root in roots:
        files += [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    found = []
    for path in files:
        for view in _text_views(path):
            found += [f"{path}: {' '.join(sentence)}" for sentence in sorted(_sentences_in(_words(view), sentences))]
    return sorted(set(found))


def test_scan_finds_planted_sentences(covid, tmp_path):
    """The scan finds a report in plain text, escaped JSON and HTML, compressed parquet and binary data."""
    text = next(t for t in covid.reports["text"] if "'" in t and len(t) > 100)
    sentences = _report_sentences(covid)
    planted = [s for s in sentences if " ".join(s) in " ".join(_words(text))]
    assert planted
    (tmp_path / "a.txt").write_text(text.upper())
    (tmp_path / "b.json").write_text(json.dumps({"x": [text + ' "quoted" é']}))
    (tmp_path / "c.html").write_text(html.escape(text + " 'x' & <y>"))
    pd.DataFrame({"text": [text]}).to_parquet(tmp_path / "d.parquet", compression="gzip")
    (tmp_path / "e.bin").write_bytes(b"\x00\xff" + text.encode() + b"\x80")
    found = _files_with_report_text([tmp_path], sentences)
    names = sorted({Path(entry.split(": ")[0]).name for entry in found})
    assert names == ["a.txt", "b.json", "c.html", "d.parquet", "e.bin"]


def test_outputs_hold_no_report_text(offline_run, demo_run, cache_dir, covid, openi):
    """No file of a demo run, its log file or the feature cache contains a report sentence of either cohort."""
    sentences = _report_sentences(covid, openi)
    assert len(sentences) > 1000
    demo_out, _ = demo_run
    assert offline_run["log"].stat().st_size > 0
    found = _files_with_report_text([offline_run["out"], offline_run["log"], demo_out, cache_dir], sentences)
    assert found == []


# Determinism

# Runs linkrisk mitigate on two embed folders with a fixed DP noise seed and a given thread count.
MITIGATE_SCRIPT = """
import sys
from pathlib import Path

import torch

torch.set_num_threads(int(sys.argv[1]))
from linkrisk.mitigate import DPConfig
from linkrisk.mitigate.run import run_mitigation

train, public, out = map(Path, sys.argv[2:5])
config = DPConfig(epochs=3, batch_size=32, noise_seed=7, init="original")
run_mitigation(train, public, [public], out, [1.0, float("inf")], config, n_boot=50, seed=0, progress=False)
"""

# Largest differences between 1 and 2 torch threads that the test allows. Measured on 2 x86-64 CPU cores with
# torch 2.14.1 on CPU: head weights differed by at most 6e-8 and one mean normalised rank by 3.2e-6.
HEAD_ATOL = 1e-6
METRIC_ATOL = 1e-4


@pytest.fixture(scope="module")
def embed_folders(demo_run, covid, openi, tmp_path_factory):
    """``linkrisk embed`` folders of COVID training patients and Open-i from the demo's saved embeddings."""
    from linkrisk.models.embed import EmbedConfig, embed_cohort
    from linkrisk.models.precomputed import PrecomputedAdapter

    demo_out, _ = demo_run
    root = tmp_path_factory.mktemp("determinism-inputs")
    config = EmbedConfig(chunk_size=128, batch_size=32, workers=0, progress=False)
    train = demo_out / "embeddings" / "covid_train" / "original"
    cohort = covid.subset_patients(set(pd.read_parquet(train / "pairs.parquet")["patient_id"]))
    embed_cohort(PrecomputedAdapter(train), cohort, root / "train", config, {"model": "precomputed"})
    public = demo_out / "embeddings" / "openi" / "original"
    embed_cohort(PrecomputedAdapter(public), openi, root / "public", config, {"model": "precomputed"})
    return root / "train", root / "public"


def _mitigate_in_subprocess(threads: int, train: Path, public: Path, out: Path) -> dict:
    # BLAS libraries read their thread counts from the environment; torch.set_num_threads sets torch's own.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads)}
    completed = subprocess.run([sys.executable, "-c", MITIGATE_SCRIPT, str(threads), str(train), str(public),
                                str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return strip_timing(json.loads((out / "mitigate.json").read_text()))


def _head_tensors(out: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    tensors = {}
    for path in sorted((out / "heads").rglob("heads.safetensors")):
        for name, value in load_file(path).items():
            tensors[f"{path.parent.name}/{name}"] = value
    return tensors


def _numbers_apart(a, b, atol: float, where: str = "") -> list[str]:
    """Return where two JSON values differ in structure, in a non-number, or in a number by more than ``atol``."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a)} != {sorted(b)}"]
        return [d for key in a for d in _numbers_apart(a[key], b[key], atol, f"{where}/{key}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _numbers_apart(x, y, atol, f"{where}[{i}]")]
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        if math.isnan(a) and math.isnan(b) or math.isclose(a, b, rel_tol=0, abs_tol=atol):
            return []
        return [f"{where}: {a} != {b}"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def test_seeded_mitigation_is_deterministic(embed_folders, tmp_path):
    """Two seeded mitigations give identical results; 1 and 2 torch threads agree within float32 rounding.

    With one thread, two runs give the same mitigate.json (timing fields stripped) and byte-identical
    heads. With two threads, BLAS sums in another order, so head weights differ by float32 rounding (at
    most HEAD_ATOL). A near-tie of scores may then rank the other way and move a mean normalised rank by
    half a rank step, within METRIC_ATOL here. A tie that flips a Recall@K hit would exceed METRIC_ATOL.
    """
    train, public = embed_folders
    first = _mitigate_in_subprocess(1, train, public, tmp_path / "one-a")
    second = _mitigate_in_subprocess(1, train, public, tmp_path / "one-b")
    two_threads = _mitigate_in_subprocess(2, train, public, tmp_path / "two")

    assert first["sweep"]["points"]
    assert first == second
    heads_a = sorted((tmp_path / "one-a" / "heads").rglob("heads.safetensors"))
    assert heads_a
    for path in heads_a:
        assert path.read_bytes() == (tmp_path / "one-b" / path.relative_to(tmp_path / "one-a")).read_bytes()

    assert _numbers_apart(first, two_threads, METRIC_ATOL) == []
    tensors_one, tensors_two = _head_tensors(tmp_path / "one-a"), _head_tensors(tmp_path / "two")
    assert tensors_one.keys() == tensors_two.keys()
    for name in tensors_one:
        np.testing.assert_allclose(tensors_two[name], tensors_one[name], rtol=0, atol=HEAD_ATOL, err_msg=name)


# Full disk


def test_full_disk_keeps_previous_results(demo_run, data_dir, tmp_path, monkeypatch):
    """ENOSPC while rewriting results.json of a complete run leaves the old file and no temp file behind.

    The demo's computation is replaced by a rewrite of its results through the writer it uses
    (``linkrisk.pipeline.write_json``), so the test costs no second demo run.
    """
    import linkrisk.pipeline

    demo_out, _ = demo_run
    out = tmp_path / "demo"
    shutil.copytree(demo_out, out)
    before = (out / "results.json").read_bytes()
    log = tmp_path / "demo.log"

    def rewrite_results(config, extra=None):
        results = json.loads((config.out_dir / "results.json").read_text(encoding="utf-8"))
        results["finished"] = "rewritten"
        linkrisk.pipeline.write_json(config.out_dir / "results.json", results)

    real_write_text = pathlib.Path.write_text

    def disk_fills_halfway(self, data, *args, **kwargs):
        if self.name.startswith(".results.json.") and self.name.endswith(".tmp"):
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(linkrisk.pipeline, "run_demo", rewrite_results)
    monkeypatch.setattr(pathlib.Path, "write_text", disk_fills_halfway)
    result = _invoke(["demo", "--data", str(data_dir), "--out", str(out), "--quiet", "--log-file", str(log)])

    assert result.exit_code == 1, result.output
    assert (out / "results.json").read_bytes() == before
    assert sorted(p.name for p in out.rglob("*.tmp")) == []
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {out / 'results.json'}: No space left on device;")
    assert "complete files and cache chunks are kept" in lines[0]
    assert "exit status 1: " in log.read_text(encoding="utf-8")
