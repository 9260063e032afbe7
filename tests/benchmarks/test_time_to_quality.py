"""benchmarks/time_to_quality.py's smoke run (``--quick``): one JSON object whose figures agree with each other."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "time_to_quality.py"
PBMC = REPO / ".." / "shared" / "data" / "pbmc10k_cite.h5ad"


def _check_dataset(entry: dict, cap: int) -> None:
    scvi, st = entry["scvi_tools"], entry["streamtotal"]
    data = entry["data"]
    assert data["validation_cells"] == round(0.1 * data["cells"])
    assert data["training_cells"] + data["validation_cells"] == data["cells"]

    # scvi-tools: its own -ELBO, checked term by term.
    assert 1 <= scvi["epochs"] <= cap
    assert 0 < scvi["setup_seconds"] < scvi["wall_seconds"]
    assert math.isfinite(scvi["val_neg_elbo"]) and scvi["elbo_terms_sum_matches"]
    assert set(scvi["elbo_terms"]) == {"reconst_loss_gene", "reconst_loss_protein", "kl_div_z", "kl_div_l_gene",
                                       "kl_div_back_pro"}
    assert 0.0 <= scvi["bio_conservation"] <= 1.0

    # streamtotal: the target is scvi-tools' final value; the reached epoch is the first at or below it.
    full = st["full_run"]
    assert st["target_val_neg_elbo"] == scvi["val_neg_elbo"]
    assert full["elbo_terms_sum_matches"] and full["epochs"] <= cap
    log = st["epochs_log"]
    assert [row["epoch"] for row in log] == list(range(1, full["epochs"] + 1))
    seconds = [row["seconds"] for row in log]
    assert seconds == sorted(seconds) and full["setup_seconds"] < seconds[0] <= full["wall_seconds"]
    assert st["best_val_neg_elbo"] == min(row["val_neg_elbo"] for row in log)
    assert log[-1]["val_neg_elbo"] == full["val_neg_elbo"]
    target = st["target_val_neg_elbo"]
    if st["time_to_target_seconds"] is None:
        assert all(row["val_neg_elbo"] > target for row in log)
        assert entry["wall_time_ratio"] is None and st["bio_conservation_at_target"] is None
        assert entry["goal_met"]["both"] is False
        return
    reached = log[st["epoch_reached"] - 1]
    assert all(row["val_neg_elbo"] > target for row in log[: st["epoch_reached"] - 1])
    assert st["val_neg_elbo_at_target"] == reached["val_neg_elbo"] <= target
    assert st["time_to_target_seconds"] == reached["seconds"]
    assert entry["wall_time_ratio"] == st["time_to_target_seconds"] / scvi["wall_seconds"]
    assert 0.0 <= st["bio_conservation_at_target"] <= 1.0
    goal = entry["goal_met"]
    assert goal["wall_time_ratio_at_most_0.2"] == (entry["wall_time_ratio"] <= 0.2)
    assert goal["bio_conservation_no_lower"] == (st["bio_conservation_at_target"] >= scvi["bio_conservation"])
    assert goal["both"] == (goal["wall_time_ratio_at_most_0.2"] and goal["bio_conservation_no_lower"])


DATASETS = "pbmc10k,simulated_100k" if PBMC.exists() else "simulated_100k"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One smoke run of both methods: its report and work directory."""
    work = tmp_path_factory.mktemp("ttq")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--datasets", DATASETS, "--workdir", str(work)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report_path = work / "report.json"
    report_path.write_text(proc.stdout)
    return json.loads(proc.stdout), report_path, work  # stdout is one JSON object; progress went to stderr


def test_quick_run_prints_one_consistent_json_object(quick_run):
    report, _, tmp_path = quick_run
    datasets = DATASETS
    assert report["benchmark"] == "time_to_quality" and report["quick"] is True
    assert set(report["datasets"]) == set(datasets.split(","))
    for entry in report["datasets"].values():
        _check_dataset(entry, report["max_epochs_cap"])
    # Both methods were given the same held-out cells, and they are the ones streamtotal validated on (the
    # script stops with an error otherwise).
    for name in report["datasets"]:
        assert (tmp_path / name / "val_ids.npy").is_file()


def test_exploring_other_settings_reuses_the_peer_and_records_the_options(quick_run, tmp_path):
    """``--scvi-result`` reuses scvi-tools' entry (refused for other data); ``--train-option`` reaches the Trainer
    (a KL warm-up over the whole run, visible in metrics.jsonl); ``--stop-at-target``
    ends the run at the reached epoch."""
    report, report_path, _ = quick_run
    args = [sys.executable, str(SCRIPT), "--quick", "--datasets", "simulated_100k", "--scvi-result",
            str(report_path), "--workdir", str(tmp_path)]
    options = ["--train-option", "kl_warmup_fraction=1", "--train-option", "log_every_steps=1", "--stop-at-target"]
    proc = subprocess.run(args + options, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = json.loads(proc.stdout)
    assert again["streamtotal_train_options"] == {"kl_warmup_fraction": 1, "log_every_steps": 1}
    assert again["stop_at_target"] is True and again["scvi_result_reused_from"] == str(report_path)
    entry = again["datasets"]["simulated_100k"]
    earlier = report["datasets"]["simulated_100k"]["scvi_tools"]
    assert entry["scvi_tools"] == {**earlier, "reused": True}
    _check_dataset(entry, again["max_epochs_cap"])
    if entry["streamtotal"]["epoch_reached"] is not None:
        assert entry["streamtotal"]["full_run"]["epochs"] == entry["streamtotal"]["epoch_reached"]
    steps = [json.loads(line) for line in (tmp_path / "simulated_100k" / "streamtotal_run" / "metrics.jsonl")
             .read_text().splitlines()]
    weights = [row["kl_weight"] for row in steps if row.get("kind") == "train"]
    # Warm-up over the whole run: the weight never reaches 1 (the default, 0.15 of a few steps, is 1 throughout).
    assert weights and weights[0] == 0.0 and all(w < 1.0 for w in weights)

    # Another seed is another split: the earlier scvi-tools entry does not describe it.
    proc = subprocess.run(args + ["--seed", "1"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and "--scvi-result" in proc.stderr
    proc = subprocess.run(args + ["--train-option", "warmup=0.5"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and "warmup=0.5" in proc.stderr


def test_unknown_dataset_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--datasets", "pbmc3k"], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 2 and "pbmc3k" in proc.stderr
