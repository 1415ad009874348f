"""Crash safety: kill -9 at seeded random points of real embed and mitigate runs, then resume to the same bytes.

The inputs are the real COVID images and reports, embedded with a tiny
randomly initialised open_clip model (seeded), so every run is a real
run of the command-line program on real files but takes seconds.
Each kill loop kills one output folder several times in a row: embed runs
after a seeded random number of new chunks plus a seeded random delay,
mitigate runs right after the next epoch checkpoint of the DP point. It checks that the run after each kill reuses every chunk, point
and epoch that was complete on disk at the kill ("bytes lost" = 0), and
that the final outputs equal an uninterrupted run's byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import linkrisk.mitigate.dp as dp
from linkrisk.mitigate import DPConfig, train_dp_heads
from linkrisk.models.embed import EmbedConfig, embed_cohort, hash_weights, iter_chunk_files
from linkrisk.provenance import strip_timing

# The command-line runs below use these settings too.
CHUNKS = {"chunk_size": 16, "batch_size": 16, "workers": 0, "progress": False}
# Each run pays 5 to 9 s of start-up (imports, dataset, model) on 2 shared cores, which bounds the kill counts.
EMBED_KILLS = 3
EMBED_KILL_SEED = 7
MITIGATE_KILLS = 3
MITIGATE_KILL_SEED = 5
# One DP point and the non-private end: each DP point's noise calibration takes 10 to 20 s on 2 cores.
EPSILONS = ("0.5", "inf")
EPOCHS = 4
# Epochs per point of the mitigate kill loop: a kill may land an epoch late, so three kills need room.
KILL_LOOP_EPOCHS = 10
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def covid_embedded(tiny_clip, covid, tmp_path_factory) -> Path:
    """An uninterrupted in-process embedding of the whole COVID cohort: the reference and the training folder."""
    from linkrisk.models.adapters import load_adapter

    out = tmp_path_factory.mktemp("covid-embedded")
    embed_cohort(load_adapter("open-clip", tiny_clip), covid, out, EmbedConfig(**CHUNKS),
                 {"model": "open-clip", "weights_sha256": hash_weights(tiny_clip)})
    return out


@pytest.fixture(scope="module")
def openi_public(tiny_clip, openi, tmp_path_factory) -> Path:
    """The Open-i patients that have images, with their reports: the public cohort of the mitigation runs."""
    from linkrisk.models.adapters import load_adapter

    cohort = openi.subset_patients(set(openi.images["patient_id"]), name="openi_public")
    out = tmp_path_factory.mktemp("openi-public")
    embed_cohort(load_adapter("open-clip", tiny_clip), cohort, out, EmbedConfig(**CHUNKS),
                 {"model": "open-clip", "weights_sha256": hash_weights(tiny_clip)})
    return out


# Every run uses the same fixed thread count: MKL may otherwise lower it on a busy machine (MKL_DYNAMIC), which
# changes float rounding between the interrupted and the uninterrupted run.
_ENV = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "MKL_DYNAMIC": "FALSE"}


def _start(command: list[str], log: Path) -> subprocess.Popen:
    """Start ``command`` in its own session, logging to ``log`` and writing its stderr beside it."""
    with open(log.with_suffix(".stderr"), "wb") as stderr:
        return subprocess.Popen([*command, "--log-file", str(log)], stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True, env=_ENV)


def _kill_when(process: subprocess.Popen, log: Path, reached, delay_s: float) -> None:
    """SIGKILL ``process`` ``delay_s`` seconds after ``reached()`` first returns True; fail if it ends before."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not reached():
        if process.poll() is not None:
            stderr = log.with_suffix(".stderr").read_text(errors="replace")[-2000:]
            pytest.fail(f"the run ended (exit code {process.returncode}) before the kill point: {stderr}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"kill point not reached within {RUN_TIMEOUT_S} s")
        time.sleep(0.01)
    time.sleep(delay_s)
    assert process.poll() is None, "the run ended during the delay before the kill"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _finish(command: list[str], log: Path) -> None:
    result = subprocess.run([*command, "--log-file", str(log)], capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S, env=_ENV)
    assert result.returncode == 0, result.stderr[-3000:]


def _chunk_counts(out: Path) -> dict[str, int]:
    counts = {"images": 0, "reports": 0}
    for path in iter_chunk_files(out):
        counts[path.parent.name] += 1
    return counts


def _reused_chunks(log: Path) -> dict[str, int]:
    """Chunks that the run logging to ``log`` found complete and reused, per side (a side it never reached is absent)."""
    text = log.read_text(encoding="utf-8")
    reused = {}
    for side, label in (("images", "image features"), ("reports", "report features")):
        match = re.search(rf"{label}: \d+ chunks, (\d+) reused", text)
        if match:
            reused[side] = int(match.group(1))
    return reused


def test_embed_survives_kill_loop(tiny_clip, covid_embedded, data_dir, tmp_path):
    out = tmp_path / "embed"
    command = [sys.executable, "-m", "linkrisk.cli", "embed", "--model", "open-clip", "--weights", str(tiny_clip),
               "--dataset", f"covid:{data_dir / 'covid-chestxray'}", "--out", str(out),
               "--chunk-size", str(CHUNKS["chunk_size"]), "--batch-size", str(CHUNKS["batch_size"]),
               "--workers", "0", "--quiet"]
    rng = random.Random(EMBED_KILL_SEED)
    # Kill points in chunk files on disk, out of 23 image and 19 report chunks, so kills land in both phases.
    targets = sorted(rng.sample(range(2, 40), EMBED_KILLS))
    complete_at_kill = []
    for run, target in enumerate(targets):
        # A run always writes at least one new chunk before it is killed, and leaves a few to write, so a fast
        # machine cannot finish the run before the kill lands.
        target = min(max(target, sum(_chunk_counts(out).values()) + 1), 23 + 19 - 4)
        log = tmp_path / f"run{run}.log"
        process = _start(command, log)
        _kill_when(process, log, lambda: sum(_chunk_counts(out).values()) >= target, rng.uniform(0, 0.05))
        complete_at_kill.append(_chunk_counts(out))
    _finish(command, tmp_path / f"run{EMBED_KILLS}.log")

    lost = 0
    for run, complete in enumerate(complete_at_kill):
        reused = _reused_chunks(tmp_path / f"run{run + 1}.log")
        assert reused["images"] == complete["images"], f"kill {run}"
        if complete["reports"]:
            assert reused["reports"] == complete["reports"], f"kill {run}"
        lost += sum(complete.values()) - sum(reused.get(side, 0) for side in complete)
    print(f"embed: {EMBED_KILLS} kills survived, chunks complete at each kill {complete_at_kill}, chunks lost {lost}")
    assert lost == 0
    summary = json.loads((out / "embed.json").read_text())
    assert summary["chunks"]["images"]["reused"] == complete_at_kill[-1]["images"]
    assert summary["chunks"]["images"]["computed"] == summary["chunks"]["images"]["total"] - complete_at_kill[-1]["images"]
    assert summary["chunks"]["reports"]["reused"] == complete_at_kill[-1]["reports"]
    assert complete_at_kill[-1]["images"] + complete_at_kill[-1]["reports"] < 23 + 19, "the last kill came too late"
    for name in ("image_features.npy", "report_features.npy", "image.npy", "report.npy"):
        assert (out / name).read_bytes() == (covid_embedded / name).read_bytes(), name
    assert not list((out / "cache").rglob("*.tmp"))


def _point_states(heads_dir: Path) -> dict[str, int | str | None]:
    """Per epsilon: "finished", the last complete epoch of its training checkpoint, or None (nothing on disk)."""
    states = {}
    for epsilon in EPSILONS:
        if (heads_dir / f"eps-{epsilon}.json").is_file():
            states[epsilon] = "finished"
            continue
        try:
            saved = torch.load(heads_dir / f"eps-{epsilon}" / "dp-training.pt", map_location="cpu", weights_only=True)
        except FileNotFoundError:
            # No checkpoint yet, or the point finished between the two checks.
            states[epsilon] = "finished" if (heads_dir / f"eps-{epsilon}.json").is_file() else None
            continue
        states[epsilon] = int(saved["epoch"])
    return states


def _complete_epochs(states: dict) -> int:
    return sum(KILL_LOOP_EPOCHS if state == "finished" else (state or 0) for state in states.values())


def _reused_epochs(log: Path, states_at_kill: dict) -> int:
    """Epochs that the run logging to ``log`` reused: finished points in full, and the epoch it resumed after."""
    text = log.read_text(encoding="utf-8")
    reused = 0
    for epsilon, state in states_at_kill.items():
        if f"epsilon {epsilon}: reusing the finished point" in text:
            reused += KILL_LOOP_EPOCHS
        match = re.search(rf"DP: resuming from \S*eps-{re.escape(epsilon)}/dp-training\.pt after epoch (\d+) of", text)
        if match:
            reused += int(match.group(1))
    return reused


def test_mitigate_survives_kill_loop(covid_embedded, openi_public, tmp_path):
    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "linkrisk.cli", "mitigate", "--train", str(covid_embedded),
                "--public", str(openi_public), "--out", str(out), "--epsilons", ",".join(EPSILONS),
                "--epochs", str(KILL_LOOP_EPOCHS), "--batch-size", "32", "--n-boot", "20", "--dp-noise-seed", "7",
                "--quiet"]

    reference = tmp_path / "uninterrupted"
    _finish(command(reference), tmp_path / "uninterrupted.log")

    out = tmp_path / "killed"
    rng = random.Random(MITIGATE_KILL_SEED)
    states_at_kill = []
    for run in range(MITIGATE_KILLS):
        before = _complete_epochs(_point_states(out / "heads"))
        # One more epoch per kill, within the first (DP) point. On a fast machine an epoch can finish between
        # the poll and the kill, so a kill may land an epoch later; 10 epochs leave room for three kills.
        target = before + 1
        assert target < KILL_LOOP_EPOCHS, f"kill {run}: the first point already has {before} epochs on disk"
        log = tmp_path / f"run{run}.log"
        process = _start(command(out), log)
        _kill_when(process, log, lambda: _complete_epochs(_point_states(out / "heads")) >= target,
                   rng.uniform(0, 0.02))
        states_at_kill.append(_point_states(out / "heads"))
    _finish(command(out), tmp_path / f"run{MITIGATE_KILLS}.log")

    lost = 0
    for run, states in enumerate(states_at_kill):
        complete = _complete_epochs(states)
        assert complete > 0, f"kill {run}: {states}"
        reused = _reused_epochs(tmp_path / f"run{run + 1}.log", states)
        assert reused == complete, f"kill {run}: {states}"
        lost += complete - reused
    print(f"mitigate: {MITIGATE_KILLS} kills survived, point states at each kill {states_at_kill}, epochs lost {lost}")
    # Every kill comes within 0.02 s of an epoch checkpoint of the first point, before that point finishes.
    assert any(isinstance(state, int) for states in states_at_kill for state in states.values()), \
        "no kill landed while a point was training"

    got = json.loads((out / "mitigate.json").read_text())
    expected = json.loads((reference / "mitigate.json").read_text())
    assert strip_timing(got) == strip_timing(expected)
    for epsilon in EPSILONS:
        for name in ("heads.safetensors", "heads.json"):
            path = Path("heads") / f"eps-{epsilon}" / name
            assert (out / path).read_bytes() == (reference / path).read_bytes(), path
        assert not (out / "heads" / f"eps-{epsilon}" / "dp-training.pt").exists()
    assert not list(out.rglob("*.tmp"))


@pytest.fixture(scope="module")
def toy():
    """60 images of 30 patients, 30 reports, plus a public cohort, from a seeded generator."""
    rng = np.random.default_rng(0)
    reports = rng.normal(size=(30, 12)).astype(np.float32)
    report_row = np.repeat(np.arange(30), 2)
    images = (reports[report_row] @ rng.normal(size=(12, 20)) + 0.1 * rng.normal(size=(60, 20))).astype(np.float32)
    patients = np.repeat(np.arange(30), 2).astype(str)
    public_images = rng.normal(size=(25, 20)).astype(np.float32)
    public_reports = rng.normal(size=(40, 12)).astype(np.float32)
    return images, reports, report_row, patients, public_images, public_reports


# A fixed noise multiplier skips the calibration, which takes seconds.
TOY = DPConfig(epsilon=1.0, delta=1e-5, epochs=4, batch_size=10, embed_dim=8, bank_size=40, noise_multiplier=1.2)


class _Killed(Exception):
    pass


def _train_until_epoch(toy, config, checkpoint: Path, epoch: int, monkeypatch) -> None:
    """Train with a checkpoint and stop right after the checkpoint of ``epoch`` is written, as a kill would."""
    save = dp._save_training_state

    def save_then_stop(path, state):
        save(path, state)
        if state["epoch"] == epoch:
            raise _Killed

    monkeypatch.setattr(dp, "_save_training_state", save_then_stop)
    with pytest.raises(_Killed):
        train_dp_heads(*toy, config, progress=False, checkpoint=checkpoint)
    monkeypatch.setattr(dp, "_save_training_state", save)


def _assert_same_heads(expected, actual) -> None:
    for (name, want), got in zip(expected.state_dict().items(), actual.state_dict().values()):
        assert torch.equal(want, got), name


@pytest.mark.parametrize(("loss", "stops"), [("public_bank", (0, 2, EPOCHS)), ("in_batch", (2,))])
def test_seeded_resume_is_bit_identical(toy, tmp_path, monkeypatch, loss, stops):
    """Ghost clipping (public bank) and per-sample clipping (in-batch) resume to the same heads and record."""
    config = dataclasses.replace(TOY, noise_seed=3, loss=loss)
    heads, record = train_dp_heads(*toy, config, progress=False)
    for stop in stops:
        checkpoint = tmp_path / f"stop{stop}" / "dp-training.pt"
        _train_until_epoch(toy, config, checkpoint, stop, monkeypatch)
        saved = torch.load(checkpoint, weights_only=True)
        assert saved["epoch"] == stop
        assert "noise_generator" in saved
        resumed, resumed_record = train_dp_heads(*toy, config, progress=False, checkpoint=checkpoint)
        _assert_same_heads(heads, resumed)
        assert resumed_record == record


def test_unseeded_resume_counts_every_step_once(toy, tmp_path, monkeypatch, caplog):
    _, uninterrupted = train_dp_heads(*toy, TOY, progress=False)
    checkpoint = tmp_path / "dp-training.pt"
    _train_until_epoch(toy, TOY, checkpoint, 2, monkeypatch)
    saved = torch.load(checkpoint, weights_only=True)
    assert "noise_generator" not in saved
    assert "sampling_generator" not in saved
    assert saved["steps"] == 2 * 3
    with caplog.at_level("INFO", logger="linkrisk"):
        _, record = train_dp_heads(*toy, TOY, progress=False, checkpoint=checkpoint)
    assert "after epoch 2 of 4 (6 steps done); sampling and noise continue from fresh OS entropy" in caplog.text
    assert record["steps"] == EPOCHS * 3
    assert record["epsilon_spent"] == uninterrupted["epsilon_spent"]
    assert record["formal_guarantee"] is True


def test_changed_inputs_do_not_resume(toy, tmp_path, monkeypatch, caplog):
    config = dataclasses.replace(TOY, noise_seed=3)
    checkpoint = tmp_path / "dp-training.pt"
    changed_images = toy[0].copy()
    changed_images[0, 0] += 1.0
    cases = {"lr": (dataclasses.replace(config, lr=0.02), toy),
             "epochs": (dataclasses.replace(config, epochs=5), toy),
             "features": (config, (changed_images, *toy[1:]))}
    for name, (changed_config, inputs) in cases.items():
        _train_until_epoch(toy, config, checkpoint, 2, monkeypatch)
        expected, expected_record = train_dp_heads(*inputs, changed_config, progress=False)
        caplog.clear()
        with caplog.at_level("INFO", logger="linkrisk"):
            heads, record = train_dp_heads(*inputs, changed_config, progress=False, checkpoint=checkpoint)
        assert "was written for other inputs or options, so training starts from epoch 0" in caplog.text, name
        assert "resuming" not in caplog.text, name
        _assert_same_heads(expected, heads)
        assert record == expected_record, name


def test_damaged_checkpoint_starts_over(toy, tmp_path, caplog):
    config = dataclasses.replace(TOY, noise_seed=3)
    expected, _ = train_dp_heads(*toy, config, progress=False)
    checkpoint = tmp_path / "dp-training.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    stale = tmp_path / ".dp-training.pt.x1y2.tmp"
    stale.write_bytes(b"partial")
    with caplog.at_level("WARNING", logger="linkrisk"):
        heads, _ = train_dp_heads(*toy, config, progress=False, checkpoint=checkpoint)
    assert "is not readable" in caplog.text
    assert not stale.exists()
    _assert_same_heads(expected, heads)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == EPOCHS
