"""`python -m launch render`: every value checked before rendering, bad ones refused in one line."""

import pytest

from launch import catalog, render
from launch.values import LaunchError
from tests.cli_output import assert_one_line_error, run_module
from tests.launch.samples import SAMPLES


def test_every_template_has_samples_and_renders():
    assert sorted(SAMPLES) == sorted(catalog.TEMPLATES)
    for path, values in SAMPLES.items():
        text = render.render(path, values)
        assert "{{" not in text and "{%" not in text, path
        for value in values.values():  # every value given reaches the file (quoted or not)
            assert value.split()[0].strip("'") in text, (path, value)


def test_a_template_reading_an_undeclared_value_fails_by_name(tmp_path, monkeypatch):
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "train.sbatch").write_text("#!/bin/bash\necho {{ nodes }} {{ nodez }}\n")
    monkeypatch.setattr(render, "TEMPLATE_DIR", str(tmp_path))
    with pytest.raises(LaunchError, match="'nodez' is undefined"):
        render.render("slurm/train.sbatch", SAMPLES["slurm/train.sbatch"])


@pytest.mark.parametrize("path,change,complaint", [
    ("slurm/train.sbatch", {"nodes": None}, "slurm/train.sbatch needs nodes: add --set nodes=..."),
    ("slurm/train.sbatch", {"noeds": "2"}, "has no value 'noeds'; did you mean nodes?"),
    ("slurm/train.sbatch", {"nodes": "0"}, "nodes='0' must be a positive integer"),
    ("slurm/train.sbatch", {"nodes": "two"}, "nodes='two' must be a positive integer"),
    ("slurm/train.sbatch", {"tasks_per_node": "4"}, "tasks_per_node=4 with gpus_per_node=8"),
    ("slurm/train.sbatch", {"time": "1 day"}, "time='1 day' is not a SLURM time limit"),
    ("slurm/train.sbatch", {"workdir": "runs/small"}, "workdir='runs/small' must be an absolute path"),
    ("slurm/train.sbatch", {"overrides": "--steps=3"}, "it takes config overrides --config.KEY=VALUE"),
    ("slurm/train.sbatch", {"overrides": "steps=3"}, "'steps=3', which is not a --name or --name=value flag"),
    ("slurm/train.sbatch", {"port": "70000"}, "port='70000' must be a TCP port"),
    ("k8s/train-indexed-job.yaml", {"image": "Bad Image"}, "is not a container image reference"),
    ("k8s/train-indexed-job.yaml", {"name": "Train_1"}, "name='Train_1' must be a Kubernetes name"),
    ("k8s/train-indexed-job.yaml", {"name": "1train"}, "must be a Kubernetes name"),
    ("k8s/train-indexed-job.yaml", {"name": "a" * 62}, "pod hostnames"),
    ("k8s/train-indexed-job.yaml", {"workdir": "/runs/small"}, "workdir='/runs/small' is not on the shared volume"),
    ("k8s/prepare-flink.yaml", {"flink_version": "1.18"}, "Beam's FlinkRunner runs on Flink 1.19, 1.20"),
    ("k8s/prepare-flink.yaml", {"output": "/tmp/out"}, "output='/tmp/out' is not on the shared volume"),
    ("k8s/prepare-flink.yaml", {"taskmanagers": "-1"}, "taskmanagers='-1' must be a positive integer"),
    ("slurm/prepare_spark.sbatch", {"spark_home": "spark"}, "spark_home='spark' must be an absolute path"),
])
def test_bad_values_are_refused_naming_them(path, change, complaint):
    values = {**SAMPLES[path], **change}
    values = {k: x for k, x in values.items() if x is not None}
    with pytest.raises(LaunchError) as e:
        render.render(path, values)
    assert complaint in str(e.value)


def test_defaults_stand_for_what_is_not_given():
    values = render.check_values(catalog.TEMPLATES["k8s/train-indexed-job.yaml"],
                                 {"num_processes": "2", "image": "lmlab:dev", "pvc": "runs", "config": "configs/gpt.py:tiny",
                                      "workdir": "/shared/run"})
    assert values["name"] == "lmlab-train" and values["port"] == 12345 and values["gpus_per_pod"] == 8
    assert values["overrides"] == [] and values["num_processes"] == 2
    # gs:// and s3:// are reachable from every pod too
    render.render("k8s/prepare-flink.yaml", {**SAMPLES["k8s/prepare-flink.yaml"], "output": "gs://bucket/prepared"})


def test_set_pairs_are_key_value_once():
    assert render.parse_sets(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    with pytest.raises(LaunchError, match="is not KEY=VALUE"):
        render.parse_sets(["nodes"])
    with pytest.raises(LaunchError, match="given twice"):
        render.parse_sets(["nodes=1", "nodes=2"])


def test_cli_renders_to_a_file_and_refuses_bad_input_in_one_line(tmp_path):
    sets = [f"--set={k}={v}" for k, v in SAMPLES["slurm/train.sbatch"].items()]
    out = tmp_path / "train.sbatch"
    result = run_module("launch", "render", "slurm/train.sbatch", *sets, f"--out={out}", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_text() == render.render("slurm/train.sbatch", SAMPLES["slurm/train.sbatch"])
    assert out.stat().st_mode & 0o111  # executable, like any batch script
    listed = run_module("launch", "list", "slurm/train.sbatch", timeout=120)
    assert listed.returncode == 0 and "nodes" in listed.stdout and "(required)" in listed.stdout
    assert_one_line_error(run_module("launch", "render", "slurm/train.sbatc", *sets, timeout=120),
                          "no launch template 'slurm/train.sbatc'; did you mean slurm/train.sbatch?")
    assert_one_line_error(run_module("launch", "render", "slurm/train.sbatch", "--set=nodes=2", timeout=120),
                          "needs repo, config, workdir")
    assert_one_line_error(run_module("launch", "render", timeout=120), "usage: python -m launch render TEMPLATE")
