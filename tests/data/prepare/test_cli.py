"""`python -m data.prepare`'s flags (data/prepare/cli.py, runners.py): every bad flag or input is
one line `error: ...` naming it and the fix, before any work (nothing is written); stage options
and Beam's options reach their owners; Flink and Spark without their job-server jar offline."""

import dataclasses
import json
import os
import socket

import pytest
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from data.prepare import cli, pipeline, runners
from data.tokenizer.bpe import ByteLevelBPE
from tests.cli_output import assert_one_line_error, run_module


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "in").mkdir()
    with open(root / "in" / "a.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(4))
    ByteLevelBPE.train(["document number"] * 4, 270, special_tokens=("<|endoftext|>",)).save(root / "tok")
    return root


def _argv(inputs, *extra, output="out"):
    return [f"--input={inputs / 'in' / '*.jsonl'}", f"--output={inputs / output}", f"--tokenizer={inputs / 'tok'}",
            *extra]


def test_flags_reach_the_config_the_stages_and_beam(inputs):
    config, args, beam_args = cli.config_from(_argv(
        inputs, "--stages=minhash,normalize", "--minhash_bands=8", "--minhash_rows=4", "--num_shards=2",
        "--normalize_strip_html=true", "--direct_running_mode=multi_processing", "--direct_num_workers=2"))
    assert config.stages == ("normalize", "minhash")  # the fixed order, whatever the flag's
    assert (config.stage_options["minhash"].bands, config.stage_options["minhash"].rows) == (8, 4)
    assert config.stage_options["normalize"].strip_html is True
    assert config.num_shards == 2 and args.output == str(inputs / "out")
    direct = PipelineOptions(beam_args).view_as(DirectOptions)
    assert (direct.direct_running_mode, direct.direct_num_workers) == ("multi_processing", 2)
    assert not (inputs / "out").exists()


@pytest.mark.parametrize("extra, fragments", [
    (["--bogus=1"], ["unknown flag", "--bogus=1"]),
    (["--direct_num_workers=two"], ["--direct_num_workers", "invalid int value"]),
    (["--direct_running_mode=fast"], ["--direct_running_mode", "invalid choice"]),
    (["--stages=normalize,dedup"], ["unknown stage", "dedup", "normalize,langid,quality,pii,exact,minhash,decontam"]),
    (["--minhash_bands=100"], ["--minhash_bands", "num_perm"]),
    (["--quality_min_words=many"], ["--quality_min_words", "invalid int value"]),
    (["--validation_fraction=1.5"], ["--validation_fraction=1.5", "between 0 and 1"]),
    (["--num_shards=0"], ["--num_shards=0"]),
    (["--name=My-Corpus"], ["--name='My-Corpus'", "lowercase"]),
    (["--runner=NoSuchRunner"], ["--runner=NoSuchRunner"]),
])
def test_bad_flags_are_errors_naming_them(inputs, extra, fragments):
    with pytest.raises(ValueError) as error:
        cli.config_from(_argv(inputs, *extra))
    for fragment in fragments:
        assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_inputs_tokenizer_and_outputs_are_errors(inputs):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        cli.config_from([f"--input={inputs}/none/*.txt", f"--output={inputs}/o", f"--tokenizer={inputs}/tok"])
    with pytest.raises(ValueError, match="--tokenizer=.*cannot be loaded"):
        cli.config_from([f"--input={inputs}/in/*", f"--output={inputs}/o", f"--tokenizer={inputs}/in"])
    (inputs / "busy").mkdir()
    (inputs / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no prepared dataset"):
        cli.config_from(_argv(inputs, "--overwrite", output="busy"))
    with pytest.raises(FileNotFoundError, match="parent directory"):
        cli.config_from(_argv(inputs, output="missing/parent/out"))


def _offline(url):
    return "repo.maven.apache.org is unreachable (test)"


@pytest.mark.parametrize("runner, extra, jar_flag, jar", [
    ("FlinkRunner", ["--flink_master=[local]"], "--flink_job_server_jar", "beam-runners-flink-"),
    ("SparkRunner", [], "--spark_job_server_jar", "beam-runners-spark-3-job-server-"),
])
def test_flink_and_spark_without_their_jar_offline_say_how_to_fix_it(monkeypatch, tmp_path, runner, extra,
                                                                     jar_flag, jar):
    monkeypatch.setenv("HOME", str(tmp_path))  # an empty jar cache
    options = PipelineOptions([f"--runner={runner}", *extra])
    with pytest.raises(ValueError) as error:
        runners.check_runner(options, reachable=_offline)
    message = str(error.value)
    assert jar in message and f"{jar_flag}=PATH" in message and "--job_endpoint" in message
    assert str(tmp_path / ".apache_beam" / "cache" / "jars") in message
    # A jar in Beam's cache, or a job server already running, needs no download.
    cache = tmp_path / ".apache_beam" / "cache" / "jars"
    cache.mkdir(parents=True)
    (cache / os.path.basename(runners.job_server_jar(options))).write_bytes(b"jar")
    runners.check_runner(options, reachable=_offline)
    runners.check_runner(PipelineOptions([f"--runner={runner}", "--job_endpoint=localhost:8099"]),
                         reachable=_offline)


def test_a_missing_job_server_jar_file_is_named():
    with pytest.raises(ValueError, match="--flink_job_server_jar=/no/such.jar does not exist"):
        runners.check_runner(PipelineOptions(["--runner=FlinkRunner", "--flink_job_server_jar=/no/such.jar"]))


def _maven_resolves() -> bool:
    try:
        socket.getaddrinfo("repo.maven.apache.org", 443)
        return True
    except OSError:
        return False


def test_the_command_line_prints_one_line_and_writes_nothing(inputs):
    result = run_module("data.prepare", *_argv(inputs, "--bogus=1"))
    assert_one_line_error(result, "unknown flag", "--bogus=1")
    assert not (inputs / "out").exists()
    if not _maven_resolves():  # what FlinkRunner does here, offline: our line, before any work
        result = run_module("data.prepare", *_argv(inputs, "--runner=FlinkRunner", "--flink_master=[local]"))
        assert_one_line_error(result, "beam-runners-flink-", "cannot be downloaded", "--flink_job_server_jar=PATH")
        assert not (inputs / "out").exists()


def test_every_stage_has_its_flags():
    parser = cli.make_parser(cli.available_stages())
    flags = {a.dest for a in parser._actions}  # pylint: disable=protected-access
    assert set(cli.available_stages()) == set(pipeline.STAGE_NAMES)
    for spec in pipeline.STAGES:
        for field in dataclasses.fields(pipeline.options_type(spec)):
            assert f"{spec.name}_{field.name}" in flags
