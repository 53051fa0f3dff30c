"Faults every `aksis` command must survive without a traceback: a reader that goes away, an early Ctrl-C, numbers the parser lets through."

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aksis.core import model_config
from aksis.model import GPT, save_checkpoint
from aksis.tokenizer import save_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    "A directory with a small tokenizer.json and a tiny checkpoint, tiny.pt"
    directory = tmp_path_factory.mktemp("faults")
    tokenizer = train_tokenizer(["Once upon a time there was a tiny model. " * 20], vocab_size=300)
    save_tokenizer(tokenizer, directory / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(model_config("tiny", vocab_size=tokenizer.get_vocab_size()))
    save_checkpoint(directory / "tiny.pt", model, tokenizer)
    return directory


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    "Run a shell pipeline; its status is that of the pipeline's first command, `aksis`"
    return subprocess.run(
        ["bash", "-c", command + "; exit ${PIPESTATUS[0]}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def assert_quiet_stop(result: subprocess.CompletedProcess) -> None:
    "The reader went away: `aksis` stopped with status 1 and printed nothing on stderr"
    assert (result.returncode, result.stderr) == (1, ""), result.stderr


def test_tokenize_into_head(files):
    "`aksis tokenize ... | head -1`: the output (over 64 KiB, more than a pipe holds) is cut after one line"
    result = shell(
        "aksis tokenize --tokenizer-path tokenizer.json --text \"$(printf 'Hello, world! %.0s' {1..4000})\" | head -1",
        files,
    )
    assert_quiet_stop(result)
    assert "tokens for 56000 characters" in result.stdout and result.stdout.count("\n") == 1


def test_generate_into_head(files):
    "`aksis generate-text ... | head -c 1`: the printed prompt alone is longer than a pipe holds"
    result = shell(
        "aksis generate-text --checkpoint-path tiny.pt --device cpu --sampler greedy "
        "--prompt \"$(printf 'Once upon a time %.0s' {1..5000})\" | head -c 1",
        files,
    )
    assert_quiet_stop(result)
    assert result.stdout == "O"


def sigint_as_in_a_terminal() -> None:
    "In the child, before it runs: SIGINT's default action. A runner started in the background ignores SIGINT, and a child would inherit that"
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_while_importing_torch(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    "Run `argv`, and press Ctrl-C (send SIGINT) as soon as it is loading PyTorch's library"
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        preexec_fn=sigint_as_in_a_terminal,
    )
    maps, deadline = Path(f"/proc/{process.pid}/maps"), time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if "libtorch" in maps.read_text():
                break
        except OSError:  # not started yet, or already gone
            pass
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize(
    "args",
    [
        ["info"],
        ["tokenize", "--text", "Hello", "--tokenizer-path", "tokenizer.json"],
        ["generate-text", "--checkpoint-path", "tiny.pt", "--prompt", "Once"],
        ["train-model", "--dataset", "missing.txt"],
    ],
)
def test_ctrl_c_in_the_first_second(files, args):
    "Ctrl-C while a command is still importing PyTorch: one line and status 130, no traceback"
    for argv in (["aksis", *args], [sys.executable, "-m", "aksis.cli", *args]):
        result = interrupt_while_importing_torch(argv, files)
        assert result.returncode == 130, result.stderr
        assert result.stderr == f"aksis {args[0]}: interrupted\n"


def assert_one_line_error(result: subprocess.CompletedProcess, command: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"aksis {command}: error: "), result.stderr


@pytest.mark.parametrize(
    "flags",
    [
        ["--seed=-1"],
        ["--seed", str(10**23)],
        ["--sampler", "beam", "--length-penalty", "1000"],
        ["--sampler", "beam", "--length-penalty=-inf"],
        ["--sampler", "beam", "--length-penalty", "nan"],
    ],
)
def test_generation_numbers_out_of_range(files, flags):
    "Numbers the parser accepts but `GenerationConfig` refuses are one-line errors"
    command = [
        "generate-text",
        "--checkpoint-path",
        "tiny.pt",
        "--prompt",
        "Once",
        "--device",
        "cpu",
    ]
    result = subprocess.run(
        ["aksis", *command, *flags], capture_output=True, text=True, timeout=120, cwd=files
    )
    assert_one_line_error(result, "generate-text")


@pytest.mark.parametrize("seed", ["-1", str(10**23)])
def test_training_seed_out_of_range(tmp_path, seed):
    "A seed PyTorch cannot take is refused before any work, on one line"
    (tmp_path / "verse.txt").write_text("Shall I compare thee to a summer's day?\n" * 200)
    result = subprocess.run(
        ["aksis", "train-model", "--dataset", "verse.txt", "--preset", "tiny", f"--seed={seed}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "AKSIS_CACHE": str(tmp_path / "cache")},
    )
    assert_one_line_error(result, "train-model")
    assert not (tmp_path / "checkpoints").exists()
