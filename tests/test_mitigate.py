"""linkrisk mitigate on real embed folders: sweep, holdout, transfer, refit attacker, checkpoints and report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from linkrisk.errors import ConfigError, InputError
from linkrisk.mitigate import DPConfig
from linkrisk.mitigate.run import run_mitigation, split_holdout
from linkrisk.mitigate.sweep import headline_pools, relation
from linkrisk.models.embed import EmbedConfig, embed_cohort, hash_weights
from linkrisk.models.precomputed import load_feature_cohort

FAST = {"chunk_size": 128, "batch_size": 32, "workers": 0, "progress": False}


@pytest.fixture(scope="module")
def folders(demo_run, covid, openi, tmp_path_factory):
    """Reference-model embed folders of the real COVID and Open-i cohorts."""
    from linkrisk.models.adapters import load_adapter

    out, _ = demo_run
    weights = out / "models" / "original"
    adapter = load_adapter("reference", weights)
    meta = {"model": "reference", "weights_sha256": hash_weights(weights)}
    root = tmp_path_factory.mktemp("mitigate-inputs")
    embed_cohort(adapter, covid, root / "covid", EmbedConfig(**FAST), meta)
    embed_cohort(adapter, openi, root / "openi", EmbedConfig(**FAST), meta)
    return root / "covid", root / "openi"


@pytest.fixture(scope="module")
def mitigation(folders, tmp_path_factory):
    covid, openi = folders
    out = tmp_path_factory.mktemp("mitigate")
    config = DPConfig(epochs=3, batch_size=32, noise_seed=7, init="original")
    results = run_mitigation(covid, openi, [openi], out, [0.5, float("inf")], config, refit_aux=openi,
                             refit_ks=["all"], holdout=0.25, n_boot=100, seed=0, progress=False)
    return out, results, config


def test_mitigation_outputs(mitigation):
    out, results, _ = mitigation
    assert json.loads((out / "mitigate.json").read_text())["kind"] == "mitigation"
    points = results["sweep"]["points"]
    assert [p["epsilon"] for p in points] == [0.5, "inf"]
    assert points[0]["dp"]["epsilon_spent"]["prv"] <= 0.5
    assert points[0]["dp"]["epsilon_spent"]["rdp"] <= 0.5
    assert points[0]["dp"]["init"] == "original"
    assert points[0]["dp"]["formal_guarantee"] is False  # the noise was seeded
    relations = [row["relation"] for row in results["sweep"]["original"]]
    assert relations == ["held-out patients", "training patients", "transfer"]
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Mitigation: DP-trained heads across ε" in html
    assert "Refit attacker" in html
    assert "http://" not in html
    assert "https://" not in html


def test_original_point_matches_embed_audit(folders, mitigation):
    """The sweep's original-heads figure on the training patients equals a direct audit of the embed output."""
    from linkrisk.audit.design import build_design
    from linkrisk.audit.run import run_audit

    covid, _ = folders
    _, results, _ = mitigation
    cohort = load_feature_cohort(covid)
    train, _ = split_holdout(cohort, 0.25, 0)
    image = np.load(covid / "image.npy")
    ids = json.loads((covid / "embed.json").read_text())["dataset"]["n_images"]
    assert ids == len(image)
    keep = np.isin(cohort.patient_ids, train.patient_ids)
    reports, row = np.unique(cohort.report_row[keep], return_inverse=True)
    design = build_design(image[keep], np.load(covid / "report.npy")[reports], row, cohort.patient_ids[keep])
    expected = run_audit(design, pools=headline_pools(len(reports)), ks=[1], n_boot=100, seed=0)
    got = next(r for r in results["sweep"]["original"] if r["relation"] == "training patients")
    for a, b in zip(expected["recall"], got["recall_at_1"]):
        assert a["pool"] == b["pool"]
        assert a["value"] == pytest.approx(b["value"], abs=1e-5)


def test_rerun_reuses_finished_points(folders, mitigation, caplog):
    covid, openi = folders
    out, results, config = mitigation
    with caplog.at_level("INFO", logger="linkrisk"):
        again = run_mitigation(covid, openi, [openi], out, [0.5, float("inf")], config, holdout=0.25, n_boot=100,
                               seed=0, progress=False)
    assert caplog.text.count("reusing the finished point") == 2
    assert again["sweep"]["points"] == json.loads(json.dumps(results["sweep"]["points"]))


def test_holdout_split_is_patient_disjoint(folders):
    covid, _ = folders
    cohort = load_feature_cohort(covid)
    train, held = split_holdout(cohort, 0.25, 0)
    assert not set(train.patient_ids) & set(held.patient_ids)
    assert len(train.patient_ids) + len(held.patient_ids) == len(cohort.patient_ids)
    assert relation(held, train) == "held-out patients"
    assert relation(train, train) == "training patients"
    with pytest.raises(ConfigError, match="holdout fraction must be in"):
        split_holdout(cohort, 1.5, 0)


def test_projected_only_folder_is_rejected(demo_run):
    out, _ = demo_run
    with pytest.raises(InputError, match="mitigation trains heads on pre-projection features"):
        load_feature_cohort(out / "embeddings" / "covid_test" / "original")


def test_cli_mitigate_errors(folders, tmp_path):
    from typer.testing import CliRunner

    from linkrisk.cli import app

    covid, openi = folders
    runner = CliRunner()
    result = runner.invoke(app, ["mitigate", "--train", str(covid), "--public", str(openi), "--out", str(tmp_path),
                                 "--epsilons", "0.5,-1"])
    assert result.exit_code == 2
    assert "invalid epsilon '-1'" in result.output
    result = runner.invoke(app, ["mitigate", "--train", str(covid), "--public", str(openi), "--out", str(tmp_path),
                                 "--loss", "triplet"])
    assert result.exit_code == 2
    assert "invalid --loss 'triplet'" in result.output
    result = runner.invoke(app, ["mitigate", "--train", str(covid), "--public", str(openi), "--out", str(tmp_path),
                                 "--refit-ks", "1"])
    assert result.exit_code == 2
    assert "invalid --refit-ks" in result.output


def test_per_patient_gradients_independent_on_real_features(folders):
    """Opacus per-patient gradients on real COVID features: changing one patient leaves the others' unchanged."""
    import warnings

    import torch
    from opacus import GradSampleModule

    from linkrisk.mitigate.dp import patient_tensors
    from linkrisk.mitigate.losses import InBatchLoss, PublicBankLoss

    covid, openi = folders
    cohort, public = load_feature_cohort(covid), load_feature_cohort(openi)
    image, text, mask = patient_tensors(cohort.image_features, cohort.report_features, cohort.report_row,
                                        cohort.patient_ids)
    assert mask.sum(1).max() > 1  # some real patients have several pairs

    def grads(model, batch_image):
        module = GradSampleModule(model)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            module(batch_image, text[:8], mask[:8]).sum().backward()
        out = [p.grad_sample.detach().clone() for p in module.parameters() if p.requires_grad]
        module._close()
        return out

    changed = image[:8].clone()
    changed[0] = image[9, 0]  # patient 0 gets another patient's image features
    torch.manual_seed(0)
    heads = (torch.nn.Linear(image.shape[-1], 32), torch.nn.Linear(text.shape[-1], 32))
    bank = PublicBankLoss(*heads, torch.as_tensor(public.image_features),
                          torch.as_tensor(public.report_features[:512]), 0.1)
    for before, after in zip(grads(bank, image[:8]), grads(bank, changed)):
        assert not torch.allclose(before[0], after[0])
        torch.testing.assert_close(before[1:], after[1:], rtol=0, atol=1e-6)
    coupled = InBatchLoss(*heads, 0.1)
    pairs = zip(grads(coupled, image[:8]), grads(coupled, changed))
    assert any(not torch.allclose(before[1:], after[1:], atol=1e-6) for before, after in pairs)
