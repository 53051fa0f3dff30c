"End-to-end runs of `aksis train-model`: training, resuming, Ctrl-C, bad input, a full disk, DDP and W&B."

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aksis.cli import main
from aksis.training import load_checkpoint

VERSE = (
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
    "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date;\n"
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    "The environment of the runs: a shared cache, so each tokenizer is trained once"
    return {
        **os.environ,
        "AKSIS_CACHE": str(tmp_path_factory.mktemp("cache")),
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sonnets.txt"
    path.write_text(VERSE * 80)
    return path


def aksis(*args, env, timeout=180):
    "Run the installed `aksis` script"
    return subprocess.run(
        ["aksis", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def tiny(corpus, ckpts, *extra):
    "Flags of a tiny, fast run on the test corpus"
    return ["train-model", "--dataset", str(corpus), "--preset", "tiny", "--device", "cpu",
            "--checkpoint-dir", str(ckpts), *extra]  # fmt: skip


def losses(path):
    state = load_checkpoint(path).train_state
    return state["history"]["loss"], state["history"]["val_loss"]


def assert_one_line_error(result, message):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_train_resume_and_files(corpus, tmp_path, env):
    ckpts = tmp_path / "checkpoints"
    result = aksis(*tiny(corpus, ckpts, "--epochs", "2", "--eval-every", "3"), env=env)
    assert result.returncode == 0, result.stderr
    assert "step 3/" in result.stdout and "bits/char" in result.stdout, result.stdout
    names = {p.name for p in ckpts.iterdir()}
    assert {"epoch_1.pt", "epoch_2.pt", "latest.pt", "best.pt", "loss_curve.png", "runs"} <= names
    assert not [n for n in names if n.startswith(".")]
    checkpoint = load_checkpoint(ckpts / "epoch_2.pt")
    assert checkpoint.train_state["epoch"] == 2 and not checkpoint.model.training
    steps = checkpoint.train_state["step"]
    # --resume continues the run with its own settings; --epochs extends it
    result = aksis("train-model", "--resume", str(ckpts / "latest.pt"), "--epochs", "3", env=env)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(ckpts / "latest.pt").train_state["step"] == steps * 3 // 2
    assert (ckpts / "epoch_3.pt").exists()


def test_spec_example_flags(tmp_path, env):
    "The README's example flags, on the bundled Shakespeare (shrunk by --preset tiny and --max-steps)"
    result = aksis("train-model", "--dataset", "shakespeare", "--batch-size", "32", "--learning-rate", "5e-5",
                   "--mixed-precision", "--preset", "tiny", "--max-steps", "2",
                   "--checkpoint-dir", str(tmp_path / "ckpts"), env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "(torch.bfloat16)" in result.stdout and "step 2/2" in result.stdout, result.stdout


def test_ctrl_c_saves_and_resumes_exactly(corpus, tmp_path, env):
    run = ["--max-steps", "60", "--eval-every", "10", "--dropout", "0.1"]
    full = aksis(*tiny(corpus, tmp_path / "full", *run), env=env)
    assert full.returncode == 0, full.stderr
    process = subprocess.Popen(["aksis", *tiny(corpus, tmp_path / "cut", *run)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    for line in process.stdout:
        if line.startswith("step 10/60"):
            process.send_signal(signal.SIGINT)
            break
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted after step" in out and err.strip() == "aksis train-model: interrupted", (
        out,
        err,
    )
    step = load_checkpoint(tmp_path / "cut" / "latest.pt").train_state["step"]
    assert 10 <= step < 60
    result = aksis("train-model", "--resume", str(tmp_path / "cut" / "latest.pt"), env=env)
    assert result.returncode == 0, result.stderr
    resumed, expected = (
        losses(tmp_path / "cut" / "latest.pt"),
        losses(tmp_path / "full" / "latest.pt"),
    )
    assert resumed[0] == pytest.approx(expected[0], rel=1e-5)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory, env):
    "A finished tiny run, for the bad-input tests to resume or damage"
    ckpts = tmp_path_factory.mktemp("trained")
    result = aksis(*tiny(corpus, ckpts, "--max-steps", "2"), env=env)
    assert result.returncode == 0, result.stderr
    return ckpts


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "0"], "--batch-size: must be a positive integer, got 0"),
        (["--learning-rate", "-0.001"], "--learning-rate: must be greater than 0"),
        (["--warmup-steps", "-5"], "invalid warmup_steps -5"),
        (["--dropout", "1.5"], "dropout must be in [0, 1)"),
        (["--preset", "huge"], "invalid choice: 'huge'"),
        (["--dataset", "no/such/file.txt"], "file no/such/file.txt not found"),
        (["--dataset", "shakespear"], "unknown dataset 'shakespear'"),
        (["--resume", "no/such/checkpoint.pt"], "checkpoint no/such/checkpoint.pt not found"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(flags, message, corpus, tmp_path, env):
    ckpts = tmp_path / "checkpoints"
    args = [f if f != "CORPUS" else str(corpus) for f in flags]
    base = (
        ["--dataset", str(corpus)] if "--dataset" not in flags and "--resume" not in flags else []
    )
    result = aksis(
        "train-model", *base, *args, "--checkpoint-dir", str(ckpts), "--max-steps", "1", env=env
    )
    assert_one_line_error(result, message)
    assert not ckpts.exists()


def test_incompatible_or_corrupt_checkpoint(trained, tmp_path, env):
    before = (trained / "latest.pt").read_bytes()
    result = aksis(
        "train-model", "--resume", str(trained / "latest.pt"), "--d-model", "128", env=env
    )
    assert_one_line_error(result, "d_model=64 (not 128)")
    result = aksis(
        "train-model", "--resume", str(trained / "latest.pt"), "--preset", "tiny", env=env
    )
    assert_one_line_error(result, "--preset cannot be combined with --resume")
    (tmp_path / "half.pt").write_bytes(before[: len(before) // 2])
    result = aksis("train-model", "--resume", str(tmp_path / "half.pt"), env=env)
    assert_one_line_error(result, "not a readable checkpoint")
    state = torch.load(trained / "latest.pt", weights_only=True)
    state["config"]["n_layer"] = 5
    torch.save(state, tmp_path / "mismatch.pt")
    result = aksis("train-model", "--resume", str(tmp_path / "mismatch.pt"), env=env)
    assert_one_line_error(result, "incompatible with its config")
    assert (trained / "latest.pt").read_bytes() == before


def run_main(*argv):
    "Run the CLI in this process (to fake a failure inside it), capturing its output"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def test_full_disk_keeps_the_previous_checkpoint(trained, tmp_path, monkeypatch, env):
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(trained, ckpts)
    before = (ckpts / "latest.pt").read_bytes()
    monkeypatch.setenv("AKSIS_CACHE", env["AKSIS_CACHE"])

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"\0" * 4096)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    status, out, err = run_main(
        "train-model", "--resume", str(ckpts / "latest.pt"), "--max-steps", "3"
    )
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and "No space left on device" in err, err
    assert (ckpts / "latest.pt").read_bytes() == before
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]


def test_wandb_missing_is_one_line(corpus, tmp_path, monkeypatch, env):
    monkeypatch.setenv("AKSIS_CACHE", env["AKSIS_CACHE"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    status, out, err = run_main(*tiny(corpus, tmp_path / "ckpts", "--max-steps", "1", "--wandb"))
    assert status == 2 and "pip install 'aksis[wandb]'" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "ckpts").exists()


def test_wandb_offline(corpus, tmp_path, env):
    pytest.importorskip("wandb")
    ckpts = tmp_path / "ckpts"
    result = aksis(
        *tiny(corpus, ckpts, "--max-steps", "2", "--wandb"), env={**env, "WANDB_MODE": "offline"}
    )
    assert result.returncode == 0, result.stderr
    assert list((ckpts / "wandb").glob("offline-run-*")), list(ckpts.rglob("*"))


def test_ddp_matches_one_process(corpus, tmp_path, env):
    "Two gloo processes with 2 sequences each take the same steps as one process with 4"
    run = ["--max-steps", "4", "--eval-every", "2", "--dropout", "0", "--seed", "3"]
    single = aksis(*tiny(corpus, tmp_path / "one", *run, "--batch-size", "4"), env=env)
    assert single.returncode == 0, single.stderr
    torchrun = Path(sys.executable).parent / "torchrun"
    ddp = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "aksis.cli",
                          *tiny(corpus, tmp_path / "two", *run, "--batch-size", "2")],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("step 2/4") == 1, ddp.stdout  # only the first process prints
    (one_train, one_val), (two_train, two_val) = (
        losses(tmp_path / "one" / "latest.pt"),
        losses(tmp_path / "two" / "latest.pt"),
    )
    assert len(two_train) == 4
    assert two_train == pytest.approx(one_train, rel=1e-4)
    assert two_val == pytest.approx(one_val, rel=1e-4)
