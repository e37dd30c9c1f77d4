"""profiles/slurm on a real single-node SLURM cluster (tools/slurm-local.sh): config/test.yaml (a subset
of its targets, see TARGETS) runs through the SLURM executor plugin, every job is a SLURM job that
sacct knows, and the metrics equal those of the local run of the same config (the `finished_run`
fixture that tests/test_workflow.py shares).

Needs root on Debian with apt (the cluster's packages are installed on first use); skips elsewhere.
The cluster is brought up by the test (a no-op when it is already up) and taken down again when the
test started it. DCBENCH_SLURM_TEST=0 skips it on purpose.
"""

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SCRIPT = REPO / "tools" / "slurm-local.sh"
PARTITION = os.environ.get("SLURM_CI_PARTITION", "debug")
ACCOUNT = os.environ.get("SLURM_CI_ACCOUNT", "ci")
RUN_TIMEOUT = 480  # seconds; the run takes about 2 minutes on 2 cores


def unsupported() -> str | None:
    """Why this machine cannot run the test, or None."""
    if os.environ.get("DCBENCH_SLURM_TEST") == "0":
        return "DCBENCH_SLURM_TEST=0"
    check = subprocess.run(["bash", str(SCRIPT), "check"], capture_output=True, text=True)
    if check.returncode != 0:
        return check.stdout.strip() or check.stderr.strip()
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed (pip install -c requirements.lock -e '.[test]')"
    return None


REASON = unsupported()  # at collection, so that a skip costs nothing (not even the local run)
pytestmark = [pytest.mark.workflow, pytest.mark.slurm,
              pytest.mark.skipif(REASON is not None, reason=f"SLURM profile test needs root on Debian with apt-get: {REASON}")]


@pytest.fixture(scope="session")  # session: set up before the session-scoped local run it is compared with
def slurm_cluster():
    was_up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0
    up = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=900)
    if up.returncode == 4:
        pytest.skip(f"SLURM packages could not be installed: {up.stderr.strip()[-500:]}")
    assert up.returncode == 0, f"tools/slurm-local.sh up failed:\n{up.stdout}\n{up.stderr}"
    yield
    if not was_up:
        subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, timeout=300)


def ci_profile(directory: Path) -> Path:
    """profiles/slurm with its site block set to the local cluster, and quicker status polling."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    profile["default-resources"] = {"slurm_partition": PARTITION, "slurm_account": ACCOUNT}
    profile["cores"] = min(os.cpu_count() or 1, profile["cores"])  # a group job must fit on the node
    profile["slurm-init-seconds-before-status-checks"] = 3  # the plugin adds 10 s per idle check
    profile["seconds-between-status-checks"] = 3
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return directory


def sacct(*job_ids: str) -> dict[str, dict[str, str]]:
    fields = ["JobID", "State", "Account", "Partition", "ExitCode", "WorkDir", "Comment"]
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", ",".join(fields), "-j", ",".join(job_ids)],
                         capture_output=True, text=True, check=True).stdout
    rows = [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]
    return {row["JobID"]: row for row in rows}


# A subset of config/test.yaml's DAG that has every kind of job but merging and quantization: the zoo
# corpus and task data, pre-training, fine-tuning, two pruning methods, and three evaluations that go
# to SLURM as one group job. The whole config is 49 SLURM-side jobs, about 10 minutes on 2 cores (each
# job starts Snakemake twice and imports torch), too slow for CI; this subset takes about 2.
FT = "results/test/tiny-bert/zoo-sentiment/ft~adamw/seed~0"
TARGETS = [f"{FT}/metrics.json", f"{FT}/prune~dare_rate~0.9_mseed~0/metrics.json",
           f"{FT}/prune~importance_rate~0.9_mseed~0/metrics.json"]


def test_config_test_through_the_slurm_profile(slurm_cluster, finished_run, tmp_path):
    local_dir, config = finished_run
    workdir = tmp_path / "slurm-run"
    workdir.mkdir()
    profile = ci_profile(tmp_path / "profile")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "SNAKEMAKE_OUTPUT_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "snakemake", *TARGETS, "-s", str(REPO / "Snakefile"),
               "--directory", str(workdir), "--workflow-profile", str(profile), "--configfile", config]
    planned = subprocess.run([*command, "-n", "--quiet", "rules"], capture_output=True, text=True, env=env)
    assert planned.returncode == 0, planned.stderr[-3000:]
    counts = {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)\s*$", planned.stdout, re.M)}
    total = counts.pop("total")
    assert set(counts) == {"zoo_corpus", "task_data", "pretrain", "finetune", "prune", "evaluate",
                           "evaluate_finetuned"}, counts
    started = time.monotonic()
    # the plugin can hang when a status query fails (spec slurm_local.md): SIGINT, then SIGKILL
    run = subprocess.run(["timeout", "-k", "20", "-s", "INT", str(RUN_TIMEOUT), *command],
                         capture_output=True, text=True, env=env)
    elapsed = time.monotonic() - started
    assert run.returncode == 0, f"SLURM run failed after {elapsed:.0f} s:\n{run.stderr[-6000:]}"

    # Every job ran inside a SLURM job: each job's log names it (methods/io/job.py) ...
    logs = sorted((workdir / "results" / "test").rglob("*.log"))
    assert len(logs) == total, f"{len(logs)} job logs for {total} planned jobs ({counts})"
    job_of = {}
    for log in logs:
        found = re.search(r"SLURM job (\d+) on ", log.read_text())
        assert found, f"{log.relative_to(workdir)} did not run inside a SLURM job"
        job_of[log.relative_to(workdir)] = found.group(1)
    # ... which sacct lists as completed, in the profile's partition and account, run in this directory
    accounting = sacct(*sorted(set(job_of.values())))
    assert set(accounting) == set(job_of.values()), (accounting, job_of)
    for row in accounting.values():
        assert row["State"] == "COMPLETED" and row["ExitCode"] == "0:0", row
        assert (row["Account"], row["Partition"]) == (ACCOUNT, PARTITION), row
        assert Path(row["WorkDir"]).resolve() == workdir.resolve(), row
    # the three evaluations went to SLURM as one job (group "evaluation"), every other job alone, as
    # sbatch's comment (kept by sacct) says
    evaluations = {job_of[p] for p in job_of if p.name == "evaluate.log"}
    assert len(evaluations) == 1 and len(accounting) == total - 2
    submitted = Counter()
    for row in accounting.values():
        rule = next(r for r in [*counts, "evaluation"] if re.match(rf"rule_{r}(_wildcards_|_evaluate|$)", row["Comment"]))
        submitted[rule] += 1
    assert submitted == {**{r: n for r, n in counts.items() if not r.startswith("evaluate")}, "evaluation": 1}
    assert (workdir / "results" / "slurm-logs" / "rule_finetune").is_dir()
    # the fine-tune went into the between-workflow cache (profile: cache)
    assert "between-workflow cache: stored entry" in (workdir / FT / "finetune.log").read_text()

    # The same numbers (and checkpoint hashes) as the local run of the same config.
    for target in TARGETS:
        assert json.loads((workdir / target).read_text()) == json.loads((local_dir / target).read_text()), target
    print(f"SLURM run: {total} Snakemake jobs as {len(accounting)} SLURM jobs in {elapsed:.0f} s")
