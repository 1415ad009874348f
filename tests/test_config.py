"""Configuration files: checks and messages, templates, the CLI option map, and runs from a file."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import stat
import tomllib
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

import linkrisk
from linkrisk.cli import app
from linkrisk.config import NOT_CONFIG_KEYS, SCHEMA, cli_option_keys, load_config, resolve, template
from linkrisk.errors import ConfigError
from linkrisk.provenance import TIMING_FIELDS, strip_timing

runner = CliRunner()


def _minimal(**sections) -> dict:
    raw = {"run": {"out": "out"},
           "cohorts": [{"name": "a", "dataset": "covid", "path": "data/covid"}],
           "models": [{"name": "m", "adapter": "reference", "weights": "models/original"}]}
    raw.update(sections)
    return raw


# --- checks and messages -------------------------------------------------------------------------


def test_templates_resolve_with_defaults():
    demo = resolve(tomllib.loads(template(demo=True, data_dir="data")), Path("/base"))
    assert demo["demo"]["data"] == "/base/data"
    assert demo["demo"]["dp_noise_seed"] == 0
    assert demo["run"]["n_boot"] == 1000

    audit = resolve(tomllib.loads(template(demo=False, data_dir="data")), Path("/base"))
    assert [c["name"] for c in audit["cohorts"]] == ["openi", "covid"]
    assert audit["audit"]["pools"] == [10, 100, 1000, "full"]
    assert audit["mitigation"]["epsilons"] == [0.1, 0.34, 1.0, 3.0, 10.0, "inf"]
    assert audit["mitigation"]["model"] == "chexzero"


def test_template_lists_every_key():
    text = template(demo=False)
    for section, keys in SCHEMA.items():
        if section == "demo":
            continue
        for name in keys:
            assert re.search(rf"^#? ?{name} = ", text, re.MULTILINE), f"{section}.{name} missing from the template"
    demo_text = template(demo=True)
    for name in SCHEMA["demo"]:
        assert re.search(rf"^#? ?{name} = ", demo_text, re.MULTILINE)


def test_relative_paths_read_from_file_folder(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "run.toml").write_text('[run]\nout = "../runs/x"\n[demo]\ndata = "data"\n')
    config = load_config(folder / "run.toml")
    assert config["run"]["out"] == str((tmp_path / "runs" / "x").resolve())
    assert config["demo"]["data"] == str((folder / "data").resolve())


BAD_CONFIGS = [
    ({"run": {"out": "o"}, "extra": {}}, "unknown section [extra]; valid sections: run, demo"),
    (_minimal(run={"out": "o", "seeds": 1}), "run: unknown key 'seeds'; valid keys: out, cache_dir, seed"),
    (_minimal(run={"seed": 1}), "run: missing key 'out'"),
    (_minimal(run={"out": "o", "n_boot": 0}), "run.n_boot: 0 is below the minimum 1"),
    (_minimal(run={"out": "o", "n_boot": "many"}), "run.n_boot: invalid value 'many'; expected an integer"),
    (_minimal(run={"out": "o", "quiet": 1}), "run.quiet: invalid value 1; expected true or false"),
    (_minimal(run={"out": "o", "engine": "spark"}), "run.engine: invalid value 'spark'; allowed values: local, ray"),
    (_minimal(run={"out": "o", "address": "auto"}), "run.address is 'auto' but run.engine is \"local\""),
    (_minimal(audit={"precision": "fp8"}), "audit.precision: invalid value 'fp8'; allowed values: fp32, bf16, fp16"),
    (_minimal(audit={"block_size": 0}), "audit.block_size: 0 is below the minimum 1"),
    (_minimal(models=[{"name": "m", "adapter": "reference", "weights": "w", "actors": -1}]),
     "models[0].actors: -1 is below the minimum 0"),
    (_minimal(audit={"ties": "best"}), "audit.ties: invalid value 'best'; allowed values: random, optimistic, "
                                       "pessimistic"),
    (_minimal(audit={"pools": [10, 1]}), "audit.pools[1]: invalid value 1; expected an integer of at least 2"),
    (_minimal(audit={"pools": 10}), "audit.pools: invalid value 10; expected a list"),
    (_minimal(audit={"directions": ["image_to_report"]}), "audit.directions[0]: invalid value 'image_to_report'; "
                                                          "allowed values: image-to-report, report-to-image"),
    (_minimal(audit={"cohorts": ["b"]}), "audit.cohorts[0]: unknown cohort 'b'; defined cohorts: a"),
    (_minimal(probe={"cohorts": ["b"]}), "probe.cohorts[0]: unknown cohort 'b'"),
    (_minimal(mitigation={"train": "a", "public": "b"}), "mitigation.public: unknown cohort 'b'"),
    (_minimal(mitigation={"train": "a", "public": "a"}), "mitigation.public names the training cohort"),
    (_minimal(mitigation={"train": "a"}), "mitigation: missing key 'public'"),
    (_minimal(mitigation={"train": "a", "public": "a", "model": "x"}), "mitigation.model: unknown model 'x'"),
    (_minimal(mitigation={"train": "a", "public": "a", "epsilons": [0, 1]}),
     "mitigation.epsilons[0]: ε must be positive"),
    (_minimal(mitigation={"train": "a", "public": "a", "epsilons": ["infinite"]}),
     "mitigation.epsilons[0]: invalid value 'infinite'; expected a number"),
    (_minimal(mitigation={"train": "a", "public": "a", "holdout": 0.95}), "mitigation.holdout: 0.95 is above the "
                                                                          "maximum 0.9"),
    (_minimal(cohorts=[{"name": "a", "dataset": "mimic", "path": "p"}]),
     "cohorts[0].dataset: invalid value 'mimic'; allowed values: mimic-cxr, chexpert-plus, openi, covid, manifest"),
    (_minimal(cohorts=[{"name": "a", "dataset": "covid", "path": "p"}, {"name": "a", "dataset": "openi",
                                                                        "path": "q"}]),
     "[[cohorts]] name 'a' is used twice"),
    (_minimal(models=[{"name": "m", "adapter": "clip", "weights": "w"}]),
     "models[0].adapter: invalid value 'clip'; allowed values: clip-vit-b-32, open-clip"),
    (_minimal(models=[{"name": "m", "adapter": "reference", "weights": "w", "workers": -1}]),
     "models[0].workers: -1 is below the minimum 0"),
    ({"run": {"out": "o"}}, "no [[cohorts]] table; a run needs at least one (or a [demo] table instead)"),
    ({"run": {"out": "o"}, "demo": {"data": "d"}, "audit": {}}, "[demo] runs its own cohorts"),
    ({"run": {"out": "o"}, "demo": {"data": "d", "epsilon": -1}}, "demo.epsilon: -1 is below the minimum 0"),
    ({"run": {"out": "o"}, "demo": {"data": "d", "image_encoder": "vit"}},
     "demo.image_encoder: invalid value 'vit'; allowed values: randconv, histdct"),
]


@pytest.mark.parametrize("raw, message", BAD_CONFIGS)
def test_invalid_config_names_key(raw, message):
    with pytest.raises(ConfigError) as caught:
        resolve(raw, Path("/base"))
    assert message in str(caught.value)


def test_unreadable_files_rejected(tmp_path):
    with pytest.raises(ConfigError, match="configuration file not found; write one with: linkrisk config init"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nout = 1\n")
    with pytest.raises(ConfigError, match=r"bad.toml: invalid TOML"):
        load_config(bad)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[run]\nout = \"\xff\"\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(binary)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[run]\nout = "o"\nseed = -1\n')
    with pytest.raises(ConfigError, match=r"wrong.toml: run.seed: -1 is below the minimum 0"):
        load_config(wrong)


# --- CLI option map ------------------------------------------------------------------------------


def _cli_parameters() -> list[str]:
    """Return every ``"COMMAND --option"`` (and ``"COMMAND ARGUMENT"``) of the CLI, help options left out."""
    names = []

    def walk(command, path: str) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())
        for param in getattr(command, "params", []):
            if param.name == "help" or not path:
                continue
            if param.param_type_name == "argument":
                names.append(f"{path} {param.metavar or param.name.upper()}")
            else:
                names.append(f"{path} {max(param.opts, key=len)}")

    walk(typer.main.get_command(app), "")
    return names


def test_every_cli_option_maps_to_config_key():
    mapping = cli_option_keys()
    for name in _cli_parameters():
        if name.startswith("version"):
            continue
        assert name in mapping or name in NOT_CONFIG_KEYS, f"{name} maps to no configuration key"


def test_config_key_map_names_real_options():
    parameters = set(_cli_parameters())
    for option, key in cli_option_keys().items():
        assert option in parameters, f"{key} lists {option!r}, which the CLI does not have"
    for option in NOT_CONFIG_KEYS:
        assert option in parameters, f"NOT_CONFIG_KEYS lists {option!r}, which the CLI does not have"


def test_config_init_writes_and_keeps_files(tmp_path, monkeypatch):
    monkeypatch.setenv("LINKRISK_DATA", str(tmp_path / "shared"))
    path = tmp_path / "audit.toml"
    result = runner.invoke(app, ["config", "init", "--out", str(path)])
    assert result.exit_code == 0, result.output
    assert "[[models]]" in path.read_text()

    again = runner.invoke(app, ["config", "init", "--out", str(path)])
    assert again.exit_code == 2
    assert "exists; pass --force" in again.output

    forced = runner.invoke(app, ["config", "init", "--out", str(path), "--demo", "--force"])
    assert forced.exit_code == 0
    config = load_config(path)
    assert config["demo"]["data"] == str((tmp_path / "shared").resolve())


def test_config_check_prints_resolved(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[run]\nout = "o"\n[demo]\ndata = "d"\nepsilon = "inf"\n')
    result = runner.invoke(app, ["config", "check", str(path)])
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.stdout)
    assert resolved["demo"]["epsilon"] == "inf"
    assert resolved["run"]["out"] == str(tmp_path / "o")

    path.write_text('[run]\nout = "o"\n[demo]\ndata = "d"\nepsilon = "big"\n')
    bad = runner.invoke(app, ["config", "check", str(path)])
    assert bad.exit_code == 2
    assert "demo.epsilon: invalid value 'big'" in bad.output


def test_run_rejects_invalid_config(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[run]\nout = "o"\n[demo]\ndata = "d"\nepsilon = 0.5\ndp_noise = 1\n')
    result = runner.invoke(app, ["run", str(path), "--no-quiet"])
    assert result.exit_code == 2
    assert "demo: unknown key 'dp_noise'" in result.output
    assert not (tmp_path / "o").exists()


# --- runs ----------------------------------------------------------------------------------------


def _drop_timing_lines(text: str) -> str:
    pattern = re.compile(r'^\s*"(' + "|".join(TIMING_FIELDS) + r')": ')
    return "\n".join(line for line in text.splitlines() if not pattern.match(line))


def test_demo_config_rerun_identical(tmp_path, data_dir, cache_dir):
    """Two runs of the demo configuration (DP noise seeded) write the same results.json but for timing fields."""
    path = tmp_path / "demo.toml"
    text = template(demo=True, data_dir=str(data_dir))
    text = text.replace('out = "runs/demo-config"', 'out = "out"').replace("n_boot = 1000", "n_boot = 200")
    path.write_text(text.replace("# cache_dir = ...", f'cache_dir = "{cache_dir}"'))

    written = []
    for _ in range(2):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        result = runner.invoke(app, ["run", str(path), "--quiet"])
        assert result.exit_code == 0, result.output
        written.append((tmp_path / "out" / "results.json").read_text())

    first, second = (json.loads(text) for text in written)
    assert first["started"] != ""
    assert "seconds" in first
    assert strip_timing(first) == strip_timing(second)
    assert _drop_timing_lines(written[0]) == _drop_timing_lines(written[1])
    assert first["provenance"]["seeds"] == {"seed": 0, "demo.dp_noise_seed": 0}
    assert first["run_config"]["demo"]["data"] == str(data_dir.resolve())
    for name in ("config.json", "config.toml", "provenance.json", "report.html"):
        assert (tmp_path / "out" / name).is_file()


@pytest.fixture(scope="module")
def config_run(demo_run, data_dir, tmp_path_factory):
    """A cohorts-and-models run of the demo's reference model on the real COVID-19 and Open-i data."""
    out_dir, _ = demo_run
    folder = tmp_path_factory.mktemp("config-run")
    path = folder / "run.toml"
    path.write_text(f"""
[run]
out = "out"
n_boot = 100

[[cohorts]]
name = "covid"
dataset = "covid"
path = "{data_dir / 'covid-chestxray'}"

[[cohorts]]
name = "openi"
dataset = "openi"
path = "{data_dir / 'openi'}"

[[models]]
name = "reference"
adapter = "reference"
weights = "{out_dir / 'models' / 'original'}"
workers = 0
chunk_size = 128

[audit]
cohorts = ["covid"]
pools = [10, 100, "full"]
ks = [1, 5]
directions = ["image-to-report", "report-to-image"]
negatives = ["random", "label-matched"]
match = ["view", "sex", "labels"]
split_audit = true

[mitigation]
train = "covid"
public = "openi"
holdout = 0.25
epsilons = [1.0, "inf"]
epochs = 2
init = "public"
dp_noise_seed = 0
refit_aux = "covid"
refit_ks = [50]

[probe]
cohorts = ["covid"]
""")
    log = folder / "run.log"
    result = runner.invoke(app, ["run", str(path), "--quiet", "--log-file", str(log)])
    assert result.exit_code == 0, result.output
    return folder, json.loads((folder / "out" / "results.json").read_text())


def test_config_run_outputs(config_run):
    folder, results = config_run
    out = folder / "out"
    for name in ("results.json", "provenance.json", "config.json", "config.toml", "report.html"):
        assert (out / name).is_file(), name
    assert results["kind"] == "config"
    views = {(run["direction"], run["negatives"], run.get("view")) for run in results["runs"]}
    assert views == {("image_to_report", "random", None), ("image_to_report", "label_matched", None),
                     ("report_to_image", "random", "extra"), ("report_to_image", "label_matched", "extra")}
    assert all(run["model"] == "reference" and run["cohort"] == "covid" for run in results["runs"])
    main = next(run for run in results["runs"] if run["negatives"] == "random" and "view" not in run)
    assert main["recall_at_1_curve"] and main["assignment"]
    assert (out / main["embeddings"] / "risk.parquet").is_file()
    assert [p["cohort"] for p in results["probe"]] == ["covid"]
    assert {row["relation"] for row in results["sweep"]["points"][0]["targets"]} >= {"held-out patients",
                                                                                       "training patients"}
    assert results["refit"]


def test_config_run_oracles_and_split_audit(config_run, covid):
    _, results = config_run
    main = next(run for run in results["runs"] if run["negatives"] == "random" and "view" not in run)
    assert main["attribute_oracle"]["attributes"] == ["view", "sex", "labels"]
    assert main["attribute_matched"]["attributes"] == ["view", "sex", "labels"]
    assert main["file_metadata_oracle"]["attributes"] == ["file_format", "pil_mode", "size_band", "aspect_band"]
    assert main["oracle_comparison"] and main["power"]
    assert "an attacker using only view, sex, labels" in main["verdict"]
    [entry] = results["split_audit"]
    assert (entry["model"], entry["cohort"]) == ("reference", "covid")
    assert [split["split"] for split in entry["splits"]] == ["patient", "source"]
    assert all(split["n_train_images"] + split["n_test_images"] == covid.n_images for split in entry["splits"])


def test_config_run_provenance(config_run, covid, openi):
    from linkrisk.models.embed import hash_weights

    folder, results = config_run
    prov = results["provenance"]
    assert prov["packages"]["torch"].startswith("2.")
    assert prov["packages"]["linkrisk"] == linkrisk.__version__
    assert prov["inputs"]["covid"]["fingerprint"] == covid.fingerprint()
    assert prov["inputs"]["openi"]["fingerprint"] == openi.fingerprint()
    assert prov["inputs"]["covid"]["images"] == covid.n_images
    weights = results["config"]["models"][0]["weights"]
    assert prov["models"]["reference"]["weights_sha256"] == hash_weights(weights)
    assert prov["seeds"] == {"seed": 0, "mitigation.dp_noise_seed": 0}
    assert prov["machine"]["cpus"] >= 1
    on_disk = json.loads((folder / "out" / "provenance.json").read_text())
    assert on_disk["packages"] == prov["packages"] and "started" in on_disk


def test_config_run_audit_matches_direct_audit(config_run):
    folder, results = config_run
    main = next(run for run in results["runs"] if run["negatives"] == "random" and "view" not in run)
    direct = linkrisk.audit(folder / "out" / main["embeddings"], pools=[10, 100, "full"], ks=[1, 5], n_boot=100)
    assert [e["value"] for e in main["recall"]] == [e["value"] for e in direct["recall"]]
    assert [e["ci95"] for e in main["recall"]] == [e["ci95"] for e in direct["recall"]]


def test_config_run_log_file(config_run, covid):
    folder, _ = config_run
    log = folder / "run.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    text = log.read_text()
    assert "embed covid with reference: started" in text
    assert "audits: finished" in text
    texts = covid.reports["text"].dropna()
    sentences = {s.strip() for t in texts for s in re.split(r"[.\n]", t) if len(s.strip()) >= 30}
    assert not [s for s in sentences if s in text]


def test_config_rerun_resumes_identically(config_run):
    """A second run in the same folder reuses every chunk and sweep point and writes the same results."""
    folder, results = config_run
    result = runner.invoke(app, ["run", str(folder / "run.toml"), "--quiet", "--log-file", str(folder / "run.log")])
    assert result.exit_code == 0, result.output
    again = json.loads((folder / "out" / "results.json").read_text())
    assert strip_timing(again) == strip_timing(results)
    summary = json.loads((folder / "out" / "embeddings" / "reference" / "covid" / "embed.json").read_text())
    assert summary["chunks"]["images"]["computed"] == 0


def test_python_api_matches_cli(config_run):
    folder, _ = config_run
    summary = linkrisk.describe(f"covid:{json.loads((folder / 'out' / 'config.json').read_text())['cohorts'][0]['path']}")
    assert summary["images"] > 0
    assert callable(linkrisk.audit) and callable(linkrisk.mitigate) and callable(linkrisk.report)
    # Importing a submodule keeps the package callable.
    importlib.import_module("linkrisk.audit.ranks")
    assert callable(linkrisk.audit)
    with pytest.raises(ConfigError, match="invalid direction 'sideways'"):
        linkrisk.audit(folder / "out", direction="sideways")
    with pytest.raises(ConfigError, match="unknown demo option 'epsilons'"):
        linkrisk.demo("data", epsilons=1)


def test_docs_key_reference_current():
    from linkrisk.config import reference_markdown

    docs = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert docs.read_text(encoding="utf-8") == reference_markdown(), \
        "docs/config.md is out of date; regenerate it from linkrisk.config.reference_markdown()"


def test_config_run_on_ray_engine(config_run, tmp_path):
    """run.engine = "ray": missing chunks are embedded by Ray actors and the audits equal the local run's."""
    import shutil

    pytest.importorskip("ray")
    folder, results = config_run
    shutil.copytree(folder / "out" / "embeddings", tmp_path / "out" / "embeddings")
    chunks = sorted((tmp_path / "out" / "embeddings" / "reference" / "covid" / "cache").rglob("*.npz"))
    for path in chunks[::3]:
        path.unlink()
    text = (folder / "run.toml").read_text()
    text = text.replace("[run]\n", "[run]\nengine = \"ray\"\n", 1).split("[mitigation]")[0]
    (tmp_path / "run.toml").write_text(text)

    result = runner.invoke(app, ["run", str(tmp_path / "run.toml"), "--quiet"])
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    summary = json.loads((tmp_path / "out" / "embeddings" / "reference" / "covid" / "embed.json").read_text())
    assert summary["config"]["engine"] == "ray"
    assert summary["chunks"]["images"]["computed"] + summary["chunks"]["reports"]["computed"] == len(chunks[::3])
    for name in ("image.npy", "report.npy"):
        reference = folder / "out" / "embeddings" / "reference" / "covid" / name
        assert (tmp_path / "out" / "embeddings" / "reference" / "covid" / name).read_bytes() == \
            reference.read_bytes()

    def audits(entries):
        kept = []
        for entry in strip_timing(entries):
            assert entry["scoring"]["precision"] == "fp32"
            kept.append({**entry, "scoring": {**entry["scoring"], "engine": None}})
        return kept

    assert [entry["scoring"]["engine"] for entry in again["runs"]] == ["ray"] * len(again["runs"])
    assert audits(again["runs"]) == audits(results["runs"])
