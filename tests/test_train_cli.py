"End-to-end runs of `aksis train-model`: training, resuming, Ctrl-C, bad input, a full disk, DDP and W&B."

import contextlib
import io
import json
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_aksis

from aksis.cli import main
from aksis.model import load_checkpoint
from aksis.speed import BF16_MARGIN

VERSE = (
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
    "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date;\n"
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sonnets.txt"
    path.write_text(VERSE * 80)
    return path


def tiny(corpus, ckpts, *extra):
    "Flags of a tiny, fast run on the test corpus"
    return ["train-model", "--dataset", str(corpus), "--preset", "tiny", "--device", "cpu",
            "--checkpoint-dir", str(ckpts), *extra]  # fmt: skip


def losses(path):
    state = load_checkpoint(path).train_state
    return state["history"]["loss"], state["history"]["val_loss"]


def test_train_resume_and_files(corpus, tmp_path, env):
    ckpts = tmp_path / "checkpoints"
    result = run_aksis(*tiny(corpus, ckpts, "--epochs", "2", "--eval-every", "3"), env=env)
    assert result.returncode == 0, result.stderr
    assert "step 3/" in result.stdout and "bits/char" in result.stdout, result.stdout
    names = {p.name for p in ckpts.iterdir()}
    assert {"epoch_1.pt", "epoch_2.pt", "latest.pt", "best.pt", "loss_curve.png", "runs"} <= names
    assert not [n for n in names if n.startswith(".")]
    checkpoint = load_checkpoint(ckpts / "epoch_2.pt")
    assert checkpoint.train_state["epoch"] == 2 and not checkpoint.model.training
    steps = checkpoint.train_state["step"]
    # --resume continues the run with its own settings; --epochs extends it
    result = run_aksis(
        "train-model", "--resume", str(ckpts / "latest.pt"), "--epochs", "3", env=env
    )
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(ckpts / "latest.pt").train_state["step"] == steps * 3 // 2
    assert (ckpts / "epoch_3.pt").exists()


def test_spec_example_flags(tmp_path, env):
    "The README's example flags, on the bundled Shakespeare (shrunk by --preset tiny and --max-steps)"
    result = run_aksis("train-model", "--dataset", "shakespeare", "--batch-size", "32", "--learning-rate", "5e-5",
                   "--mixed-precision", "--preset", "tiny", "--max-steps", "2",
                   "--checkpoint-dir", str(tmp_path / "ckpts"), env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    (speed,) = json.loads((Path(env["AKSIS_CACHE"]) / "cpu_speed.json").read_text()).values()
    dtype = (
        "bfloat16" if speed["bf16"] > BF16_MARGIN * speed["fp32"] else "float32"
    )  # auto's choice
    assert f"(torch.{dtype})" in result.stdout and "step 2/2" in result.stdout, result.stdout


def read_lines(process):
    "A queue that a thread fills with `process`'s stdout lines, and the thread"
    lines = queue.Queue()
    reader = threading.Thread(
        target=lambda: [lines.put(line) for line in process.stdout], daemon=True
    )
    reader.start()
    return lines, reader


def wait_for_line(lines, process, prefix, timeout):
    "Take lines from `lines` until one starts with `prefix`; kill `process` and fail after `timeout` s"
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            if lines.get(timeout=left).startswith(prefix):
                return
        except queue.Empty:
            break
    process.kill()
    pytest.fail(f"no line starting with {prefix!r} within {timeout} s (exit code {process.poll()})")


def test_ctrl_c_saves_and_resumes_exactly(corpus, tmp_path, env):
    "Progress reaches a pipe as it happens, without PYTHONUNBUFFERED; Ctrl-C saves and resumes exactly"
    env = {k: v for k, v in env.items() if k != "PYTHONUNBUFFERED"}
    run = ["--max-steps", "60", "--eval-every", "10", "--dropout", "0.1"]
    full = run_aksis(*tiny(corpus, tmp_path / "full", *run), env=env)
    assert full.returncode == 0, full.stderr
    with open(tmp_path / "stderr.txt", "w+") as stderr:
        process = subprocess.Popen(["aksis", *tiny(corpus, tmp_path / "cut", *run)], env=env,
                                   stdout=subprocess.PIPE, stderr=stderr, text=True)  # fmt: skip
        try:
            lines, reader = read_lines(process)
            wait_for_line(lines, process, "step 10/60", timeout=120)
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)
            reader.join(timeout=10)
        finally:
            process.kill()
        stderr.seek(0)
        out, err = "".join(lines.queue), stderr.read()
    assert process.returncode == 130, err
    assert "interrupted after step" in out and err.strip() == "aksis train-model: interrupted", (
        out,
        err,
    )
    step = load_checkpoint(tmp_path / "cut" / "latest.pt").train_state["step"]
    assert 10 <= step < 60
    result = run_aksis("train-model", "--resume", str(tmp_path / "cut" / "latest.pt"), env=env)
    assert result.returncode == 0, result.stderr
    resumed, expected = (
        losses(tmp_path / "cut" / "latest.pt"),
        losses(tmp_path / "full" / "latest.pt"),
    )
    assert resumed[0] == pytest.approx(expected[0], rel=1e-5)


def test_progress_lines_without_a_terminal(corpus, tmp_path, env):
    result = run_aksis(*tiny(corpus, tmp_path / "ckpts", "--max-steps", "20"), env=env)
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stdout.splitlines() if "tokens/s, ETA" in line]
    assert [line.split(":")[0] for line in progress] == ["step 10/20", "step 20/20"], result.stdout
    assert "\r" not in result.stdout + result.stderr


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory, env):
    "A finished tiny run, for the bad-input tests to resume or damage"
    ckpts = tmp_path_factory.mktemp("trained")
    result = run_aksis(*tiny(corpus, ckpts, "--max-steps", "2"), env=env)
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
        (["--precision", "fp8"], "invalid choice: 'fp8'"),
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
    result = run_aksis(
        "train-model", *base, *args, "--checkpoint-dir", str(ckpts), "--max-steps", "1", env=env
    )
    assert_one_line_error(result, message)
    assert not ckpts.exists()


def test_incompatible_or_corrupt_checkpoint(trained, tmp_path, env):
    before = (trained / "latest.pt").read_bytes()
    result = run_aksis(
        "train-model", "--resume", str(trained / "latest.pt"), "--d-model", "128", env=env
    )
    assert_one_line_error(result, "d_model=64 (not 128)")
    result = run_aksis(
        "train-model", "--resume", str(trained / "latest.pt"), "--preset", "shakespeare", env=env
    )
    assert_one_line_error(result, "n_layer=2 (not 4), n_head=2 (not 4), d_model=64 (not 256)")
    (tmp_path / "half.pt").write_bytes(before[: len(before) // 2])
    result = run_aksis("train-model", "--resume", str(tmp_path / "half.pt"), env=env)
    assert_one_line_error(result, "not a readable checkpoint")
    state = torch.load(trained / "latest.pt", weights_only=True)
    state["config"]["n_layer"] = 5
    torch.save(state, tmp_path / "mismatch.pt")
    result = run_aksis("train-model", "--resume", str(tmp_path / "mismatch.pt"), env=env)
    assert_one_line_error(result, "incompatible with its config")
    assert (trained / "latest.pt").read_bytes() == before


def test_resume_as_users_type_it(corpus, trained, tmp_path, env):
    "The command that started a run, with --resume added, continues it"
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(trained, ckpts)
    result = run_aksis(
        *tiny(corpus, ckpts, "--resume", str(ckpts / "latest.pt"), "--max-steps", "3"), env=env
    )
    assert result.returncode == 0, result.stderr
    assert "steps 3-3 of 3" in result.stdout, result.stdout
    assert load_checkpoint(ckpts / "latest.pt").train_state["step"] == 3


def test_resume_goes_on_beside_its_checkpoint(trained, tmp_path, env):
    "A run resumed from a moved copy, without --checkpoint-dir, writes beside the copy, not where it was saved"
    moved = tmp_path / "moved"
    shutil.copytree(trained, moved)
    before = (trained / "latest.pt").read_bytes()
    result = run_aksis(
        "train-model", "--resume", str(moved / "latest.pt"), "--max-steps", "3", env=env
    )
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(moved / "latest.pt").train_state["step"] == 3
    assert (trained / "latest.pt").read_bytes() == before


@pytest.mark.parametrize("mixed_precision, precision", [(True, "auto"), (False, "fp32")])
def test_resume_a_run_saved_before_precision_had_a_name(
    mixed_precision, precision, trained, tmp_path, env
):
    "Checkpoints of older versions hold `mixed_precision`: on resumes as `auto`, off as `fp32`"
    checkpoint = torch.load(trained / "latest.pt", weights_only=True)
    del checkpoint["train_state"]["config"]["precision"]
    checkpoint["train_state"]["config"]["mixed_precision"] = mixed_precision
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save(checkpoint, ckpts / "latest.pt")
    resume = ["--resume", str(ckpts / "latest.pt"), "--checkpoint-dir", str(ckpts)]
    result = run_aksis("train-model", *resume, "--max-steps", "3", env=env)
    assert result.returncode == 0, result.stderr
    state = load_checkpoint(ckpts / "latest.pt").train_state
    assert (state["step"], state["config"]["precision"]) == (3, precision)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: s["config"].update(flash=True), "newer Aksis (unknown settings: flash)"),
        (lambda s: s.pop("optimizer"), "training state lacks optimizer"),
        (lambda s: s.update(step="2"), "invalid step '2'"),
    ],
)
def test_damaged_training_state_is_one_line(damage, message, trained, tmp_path, env):
    checkpoint = torch.load(trained / "latest.pt", weights_only=True)
    damage(checkpoint["train_state"])
    torch.save(checkpoint, tmp_path / "damaged.pt")
    assert_one_line_error(
        run_aksis("train-model", "--resume", str(tmp_path / "damaged.pt"), env=env), message
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seed=-1"], "invalid seed -1"),
        (["--seed", str(10**23)], "invalid seed"),
        (["--learning-rate", "inf"], "learning"),
        (["--max-seq-len", "512"], "lower --batch-size, --grad-accum-steps or --max-seq-len"),
        (["--max-seq-len", "512", "--max-steps", "3"], "or --max-seq-len, or use more text"),
    ],
)
def test_bad_numbers_are_one_line_and_write_nothing(flags, message, corpus, tmp_path, env):
    "Out-of-range numbers, and a corpus shorter than one step's windows (with or without --max-steps)"
    ckpts = tmp_path / "checkpoints"
    short = tmp_path / "short.txt"
    short.write_text(VERSE * 4)
    dataset = short if "--max-seq-len" in flags else corpus
    result = run_aksis(*tiny(dataset, ckpts, *flags), env=env)
    assert_one_line_error(result, message)
    assert not ckpts.exists()


def test_an_existing_run_is_not_replaced(corpus, trained, env):
    before = (trained / "best.pt").read_bytes()
    result = run_aksis(*tiny(corpus, trained, "--max-steps", "1"), env=env)
    assert_one_line_error(result, f"continue it with --resume {trained / 'latest.pt'}")
    assert (trained / "best.pt").read_bytes() == before


def test_checkpoint_dir_that_cannot_be_one(corpus, tmp_path, env):
    assert_one_line_error(
        run_aksis(*tiny(corpus, corpus, "--max-steps", "1"), env=env), "is a file"
    )
    result = run_aksis(*tiny(corpus, corpus / "checkpoints", "--max-steps", "1"), env=env)
    assert_one_line_error(result, "cannot create --checkpoint-dir")


def test_divergence_stops_without_saving_it(corpus, tmp_path, env):
    ckpts = tmp_path / "checkpoints"
    result = run_aksis(
        *tiny(corpus, ckpts, "--learning-rate", "1e30", "--eval-every", "1"), env=env
    )
    assert_one_line_error(result, "training diverged at step")
    for path in ckpts.glob("*.pt"):
        assert all(p.isfinite().all() for p in load_checkpoint(path).model.parameters()), path


def test_a_real_full_disk_keeps_the_previous_checkpoint(trained, tmp_path, env):
    "A file-size limit below a checkpoint's size makes every save fail as on a full disk"
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(trained, ckpts)
    before = (ckpts / "latest.pt").read_bytes()
    assert len(before) > 1_100_000  # over the limit below
    command = f"ulimit -f 1000; aksis train-model --resume {ckpts / 'latest.pt'} --max-steps 4"
    result = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, env=env, timeout=180
    )
    assert_one_line_error(result, "could not write")
    assert (ckpts / "latest.pt").read_bytes() == before
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]


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
    result = run_aksis(
        *tiny(corpus, ckpts, "--max-steps", "2", "--wandb"), env={**env, "WANDB_MODE": "offline"}
    )
    assert result.returncode == 0, result.stderr
    assert list((ckpts / "wandb").glob("offline-run-*")), list(ckpts.rglob("*"))


def test_ddp_matches_one_process(corpus, tmp_path, env):
    "Two gloo processes with 2 sequences each take the same steps as one process with 4"
    run = ["--max-steps", "4", "--eval-every", "2", "--dropout", "0", "--seed", "3"]
    single = run_aksis(*tiny(corpus, tmp_path / "one", *run, "--batch-size", "4"), env=env)
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
