"""The ``tidal`` command line: make-model end to end, serve's argument checks."""

import subprocess
import sys

import pytest

from cluster.cli import build_parser, main


def test_make_model_writes_the_same_checkpoint_as_the_library(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "cli-model"
    assert main(["make-model", "--preset", "k2-tiny", "--seed", "0", "--out", str(out)]) == 0
    assert "wrote k2-tiny (bf16, seed 0)" in capsys.readouterr().out
    for path in tiny_model_dir.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


def test_make_model_fp8_single_file(tmp_path):
    out = tmp_path / "fp8"
    assert (
        main(["make-model", "--preset", "dsv3-tiny", "--fp8", "--single-file", "--out", str(out)])
        == 0
    )
    assert (out / "model.safetensors").exists()
    assert '"quant_method": "fp8"' in (out / "config.json").read_text()


def test_module_entry_point_runs_as_a_process(tmp_path):
    out = tmp_path / "proc"
    cmd = [
        sys.executable,
        "-m",
        "cluster.cli",
        "make-model",
        "--preset",
        "k2-tiny",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors.index.json").exists()


def test_unknown_preset_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["make-model", "--preset", "k9", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "invalid choice: 'k9'" in capsys.readouterr().err


def test_serve_arguments_parse():
    args = build_parser().parse_args(
        ["serve", "--model", "/m", "--prefill", "2", "--decode", "1", "--kv-format", "fp8"]
    )
    assert (args.model, args.prefill, args.decode, args.kv_format) == ("/m", 2, 1, "fp8")
    assert (args.address, args.host, args.port, args.colocated) == ("auto", "127.0.0.1", 8000, None)


def test_serve_expert_parallel_flags_become_settings():
    from cluster.serve import settings_from_args

    argv = ["serve", "--model", "/m", "--prefill", "1", "--decode", "1", "--dtype", "bfloat16"]
    argv += ["--prefill-ranks", "32", "--decode-ranks", "96", "--ranks-per-node", "8"]
    argv += ["--gpu-mem-gb", "141", "--reserve-gb", "12", "--weight-format", "fp8"]
    argv += ["--redundant-experts", "2"]
    settings = settings_from_args(build_parser().parse_args(argv))
    assert (settings.prefill_ranks, settings.decode_ranks, settings.ranks_per_node) == (32, 96, 8)
    assert (settings.gpu_mem_gb, settings.reserve_gb, settings.redundant_experts) == (141, 12, 2)
    assert (settings.weight_format, settings.dtype) == ("fp8", "bfloat16")
    unset = settings_from_args(build_parser().parse_args(["serve", "--preset", "k2-tiny"]))
    assert (unset.decode_ranks, unset.gpu_mem_gb, unset.weight_format) == (1, None, "auto")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve"], "give --model DIR or --preset NAME"),
        (["serve", "--preset", "k2-tiny", "--colocated", "1", "--decode", "1"], "do not combine"),
        (
            ["serve", "--preset", "k2-tiny", "--prefill", "1"],
            "needs both --prefill N and --decode M",
        ),
        (["serve", "--model", "/m", "--preset", "k2-tiny"], "not allowed with argument"),
        (["serve", "--preset", "k2-tiny", "--kv-format", "int4"], "invalid choice: 'int4'"),
        (["serve", "--preset", "k2-tiny", "--decode", "-1", "--prefill", "1"], "is negative"),
        (["serve", "--preset", "k2-tiny", "--weight-format", "bf16"], "invalid choice: 'bf16'"),
    ],
)
def test_serve_rejects_bad_arguments_before_starting(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
