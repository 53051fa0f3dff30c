"Resuming a run as users type it: the command that started it, with `--resume` added."

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_aksis

from aksis.model import load_checkpoint

VERSE = (
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
    "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date;\n"
)
# The README's command, on a small corpus and with the tiny preset
COMMAND = ["train-model", "--dataset", "sonnets.txt", "--preset", "tiny", "--device", "cpu"]


@pytest.fixture
def workdir(tmp_path) -> Path:
    "A directory holding the corpus, where the runs start, as a user's project would"
    (tmp_path / "sonnets.txt").write_text(VERSE * 80)
    return tmp_path


def step(path: Path) -> int:
    return load_checkpoint(path).train_state["step"]


def test_the_same_command_with_resume_continues_an_interrupted_run(workdir, env):
    "Ctrl-C, then the README's command with `--resume checkpoints/latest.pt` appended"
    command = [*COMMAND, "--max-steps", "40", "--eval-every", "2"]
    run = subprocess.Popen(
        ["aksis", *command], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )  # fmt: skip
    latest, deadline = workdir / "checkpoints" / "latest.pt", time.monotonic() + 240
    while run.poll() is None and not latest.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=240)
    assert run.returncode in (0, 130), err  # 0: it finished before the Ctrl-C
    stopped_at = step(latest)
    result = run_aksis(*command, "--resume", "checkpoints/latest.pt", cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    assert step(latest) == 40 and stopped_at <= 40
    assert f"steps {stopped_at + 1}-40 of 40" in result.stdout or stopped_at == 40, result.stdout


def test_bare_resume_continues_from_latest_in_the_checkpoint_dir(workdir, env):
    result = run_aksis(*COMMAND, "--max-steps", "2", cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    result = run_aksis("train-model", "--resume", "--max-steps", "3", cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    assert step(workdir / "checkpoints" / "latest.pt") == 3
    # the same with another --checkpoint-dir: its latest.pt
    shutil.move(workdir / "checkpoints", workdir / "run1")
    result = run_aksis("train-model", "--checkpoint-dir", "run1", "--resume", "--max-steps", "4", cwd=workdir, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert step(workdir / "run1" / "latest.pt") == 4
    assert not (workdir / "checkpoints").exists()
    # and with nothing to continue, the error names the file it looked for
    result = run_aksis(*COMMAND, "--resume", cwd=workdir, env=env)
    assert_one_line_error(result, "checkpoints/latest.pt", command="train-model")


def test_flags_that_contradict_the_checkpoint_are_refused_by_name(workdir, env):
    result = run_aksis(*COMMAND, "--max-steps", "2", cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    for flags, name in [
        (["--preset", "shakespeare"], "n_layer=2 (not 4)"),  # the shape it names
        (["--n-layer", "3"], "n_layer=2 (not 3)"),
        (["--dataset", "other.txt"], "dataset"),
    ]:
        result = run_aksis(*COMMAND, *flags, "--resume", cwd=workdir, env=env)
        assert_one_line_error(result, name, command="train-model")
    assert step(workdir / "checkpoints" / "latest.pt") == 2  # untouched
