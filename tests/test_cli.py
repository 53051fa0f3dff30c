"End-to-end runs of the installed `aksis` console script, as a user would type them."

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_aksis, tiny_checkpoint

import aksis
from aksis import speed as aksis_speed
from aksis.cli import COMMANDS, build_parser


def test_help_lists_the_commands():
    result = run_aksis("--help")
    assert result.returncode == 0
    assert "usage: aksis" in result.stdout
    listed = re.findall(r"^ {4}(\S+)", result.stdout, re.MULTILINE)
    assert listed == list(COMMANDS), result.stdout
    commands = [
        "info",
        "tokenize",
        "load-data",
        "generate-text",
        "chat-with-model",
        "train-model",
        "fine-tune",
        "eval-chat",
        "benchmark-inference",
    ]
    assert sorted(listed) == sorted(commands)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help(name):
    "Each command's flags, generated ones included, make a valid parser and a help page"
    result = run_aksis(name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: aksis {name}") and result.stderr == ""


def test_version():
    result = run_aksis("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"aksis {aksis.__version__}")


def test_module_entry_point_matches_the_script():
    result = subprocess.run(
        [sys.executable, "-m", "aksis.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert result.stdout == run_aksis("--help").stdout


def test_unknown_command_is_a_one_line_error():
    result = run_aksis("fly-to-the-moon")
    assert_one_line_error(result, "invalid choice: 'fly-to-the-moon'")
    assert result.stdout == ""


def test_no_command_prints_help_and_fails():
    result = run_aksis()
    assert result.returncode == 2
    assert "usage: aksis" in result.stdout
    assert result.stdout == run_aksis("--help").stdout


def test_info_reports_the_default_device_and_precision(tmp_path):
    env = {**os.environ, "AKSIS_CACHE": str(tmp_path)}  # where the CPU probe is cached
    result = run_aksis("info", env=env)
    assert result.returncode == 0, result.stderr
    assert "default device: cpu" in result.stdout or "default device: cuda" in result.stdout
    # the choice and its reason: the measured speeds, where they are cached
    pattern = r"^cpu precision \(auto\): (bf16|fp32) \(.+: bf16 matmul [0-9.]+ GFLOP/s vs fp32 [0-9.]+ GFLOP/s, measured now; cached in (.+)\)$"
    match = re.search(pattern, result.stdout, re.M)
    assert match and Path(match[2]) == tmp_path / "cpu_speed.json", result.stdout
    kernel = r"^cpu inference kernels: (\w+) for one row, (\w+) for several \(GB/s of fp32 weights read, one row: (.+); eight rows: (.+); on \d+ threads?\)$"
    match = re.search(kernel, result.stdout, re.M)
    assert match, result.stdout
    fastest_one_row = float(match[3].split(", ")[0].split()[1])
    for chosen, ranking in ((match[1], match[3]), (match[2], match[4])):  # fastest first
        speeds = [
            (name, float(gbps)) for name, gbps in (item.split() for item in ranking.split(", "))
        ]
        assert chosen == speeds[0][0], result.stdout
        assert [gbps for _, gbps in speeds] == sorted((gbps for _, gbps in speeds), reverse=True)
    decoding = r"^cpu decoding precision \(auto\): (fp16 copies|fp32) \(one-row products read fp16 weights, 2 bytes each, at ([0-9.]+) GB/s and fp32 weights, 4 bytes each, at ([0-9.]+) GB/s\)$"
    match = re.search(decoding, result.stdout, re.M)
    assert match, result.stdout
    fp16_gbps, fp32_gbps = float(match[2]), float(match[3])
    assert fp32_gbps == fastest_one_row, result.stdout
    ratio = 2 * fp16_gbps / fp32_gbps  # how much faster fp16 weights are read
    if (
        abs(ratio - aksis_speed.FP16_DECODE_MARGIN) > 0.02
    ):  # rounded speeds at the margin decide nothing
        assert match[1] == ("fp16 copies" if ratio > aksis_speed.FP16_DECODE_MARGIN else "fp32"), (
            result.stdout
        )


def test_help_does_not_import_heavy_packages():
    "`aksis --help` stays fast because building the parser imports no torch, datasets or transformers"
    code = (
        "import sys, contextlib, io, aksis.cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: aksis.cli.main(['--help'])\n"
        "    except SystemExit: pass\n"
        "heavy = {'torch', 'datasets', 'transformers', 'tokenizers', 'numpy', 'fastcore'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def flags(name: str) -> dict[str, dict]:
    "The options of each flag of command `name`, by its first flag"
    return {flags[0]: options for flags, options in COMMANDS[name].flags()}


def test_every_training_setting_has_a_flag_with_its_default():
    "`train-model`'s flags are the fields of `TrainConfig` and the shape of `ModelConfig`, with their defaults"
    from aksis.core import ModelConfig
    from aksis.training import TrainConfig

    options = flags("train-model")
    training = {f.name for f in dataclasses.fields(TrainConfig)}
    shape = [f for f in dataclasses.fields(ModelConfig) if f.name not in training]
    for field in [*dataclasses.fields(TrainConfig), *shape]:
        flag = options.pop("--" + field.name.replace("_", "-"))
        if field.default is not None:
            assert flag["help"].endswith(f"(default: {field.default})"), (field.name, flag)
    assert set(options) == {"--preset", "--resume", "--mixed-precision", "--no-mixed-precision"}
    # a flag left out is not parsed at all, so that a recipe or a resumed run supplies it
    assert vars(build_parser().parse_args(["train-model"])) == {"command": "train-model"}
    help = run_aksis("train-model", "--help").stdout
    for flag in [
        "--weight-decay",
        "--grad-clip",
        "--beta2",
        "--min-lr-ratio",
        "--no-mixed-precision",
    ]:
        assert flag in help, flag


@pytest.mark.parametrize("name", ["generate-text", "chat-with-model"])
def test_every_sampler_setting_has_a_flag_with_its_default(name):
    from aksis.generation import SAMPLERS, GenerationConfig

    options = flags(name)
    assert options["--sampler"]["choices"] == SAMPLERS
    required = ["--checkpoint-path", "x"] + (["--prompt", "y"] if name == "generate-text" else [])
    parsed = vars(build_parser().parse_args([name, *required]))
    for field in dataclasses.fields(GenerationConfig):
        if field.name != "stop":
            assert parsed[field.name] == field.default, field.name
            assert options["--" + field.name.replace("_", "-")]["help"], field.name
    assert ("stop" in parsed) == (name == "generate-text")  # a chat stops at the end of a reply


def test_spec_flags_and_defaults():
    "The flags and defaults the specification's README names"
    train, generate = flags("train-model"), flags("generate-text")
    for flag in ["--dataset", "--epochs", "--batch-size", "--learning-rate", "--mixed-precision"]:
        assert flag in train, flag
    assert "(default: checkpoints)" in train["--checkpoint-dir"]["help"]
    defaults = {
        k: generate[k]["default"] for k in ["--sampler", "--top-k", "--top-p", "--beam-width"]
    }
    assert defaults == {"--sampler": "top-p", "--top-k": 50, "--top-p": 0.95, "--beam-width": 4}
    assert (generate["--temperature"]["default"], generate["--max-new-tokens"]["default"]) == (
        0.7,
        100,
    )


def test_tokenize_does_not_import_training(tmp_path):
    "`aksis tokenize --checkpoint-path` reads the checkpoint's tokenizer without the training machinery"
    checkpoint = tmp_path / "tiny.pt"
    tiny_checkpoint(checkpoint, ["Hello, world! " * 20], vocab_size=280)
    code = (
        "import sys, aksis.cli\n"
        f"status = aksis.cli.main(['tokenize', '--text', 'Hello', '--checkpoint-path', {str(checkpoint)!r}])\n"
        "assert status == 0, status\n"
        "assert 'aksis.training' not in sys.modules and 'matplotlib' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "'Hello'" in result.stdout, result.stdout


def test_readme_and_docs_use_the_project_addresses():
    "The addresses are set once, in `[project.urls]`: the README's clone command and links, and the docs config, agree"
    from nbdev.config import get_config

    root = Path(__file__).parents[1]
    cfg = get_config(root)
    readme = (root / "README.md").read_text()
    assert f"git clone {cfg.git_url} && cd {cfg.repo}" in readme
    pages = [link for link in re.findall(r"\]\(([^)\s]+)\)", readme) if ".html" in link]
    assert len(pages) > 10 and all(link.startswith(cfg.doc_url) for link in pages), pages
    nbdev_yml = (root / "nbs" / "nbdev.yml").read_text()
    assert f'site-url: "{cfg.doc_host}{cfg.doc_baseurl}"' in nbdev_yml
    assert f'repo-url: "{cfg.git_url}"' in nbdev_yml
    assert "example.com" not in readme + (root / "pyproject.toml").read_text()
