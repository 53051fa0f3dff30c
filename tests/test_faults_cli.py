"Faults every `aksis` command must survive without a traceback: a reader that goes away, an early Ctrl-C, numbers the parser lets through."

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_aksis, tiny_checkpoint

from aksis.model import load_checkpoint, save_checkpoint
from aksis.tokenizer import save_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    "A directory with a small tokenizer.json and a tiny checkpoint, tiny.pt"
    directory = tmp_path_factory.mktemp("faults")
    _, tokenizer = tiny_checkpoint(
        directory / "tiny.pt", ["Once upon a time there was a tiny model. " * 20]
    )
    save_tokenizer(tokenizer, directory / "tokenizer.json")
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
    "The reader went away: `aksis` stopped as a Unix tool that SIGPIPE ends (status 141), printing nothing on stderr"
    assert (result.returncode, result.stderr) == (141, ""), result.stderr


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


def test_short_output_into_a_closed_pipe(files):
    "`aksis tokenize ... | true`: a few lines, to a reader gone before PyTorch has loaded; the closed pipe shows up at the last flush"
    result = shell("aksis tokenize --tokenizer-path tokenizer.json --text Hello | true", files)
    assert_quiet_stop(result)


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
    assert_one_line_error(run_aksis(*command, *flags, cwd=files), command="generate-text")


@pytest.mark.parametrize("seed", ["-1", str(10**23)])
def test_training_seed_out_of_range(tmp_path, seed):
    "A seed PyTorch cannot take is refused before any work, on one line"
    (tmp_path / "verse.txt").write_text("Shall I compare thee to a summer's day?\n" * 200)
    result = run_aksis(
        "train-model", "--dataset", "verse.txt", "--preset", "tiny", f"--seed={seed}",
        cwd=tmp_path, env={**os.environ, "AKSIS_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert_one_line_error(result, command="train-model")
    assert not (tmp_path / "checkpoints").exists()


def write_history(path: Path, characters: int) -> bytes:
    "Write a chat history file of one long exchange to `path`; return its bytes"
    message = "Once upon a time " * (characters // 34)
    messages = [{"role": "user", "content": message}, {"role": "assistant", "content": message}]
    path.write_text(json.dumps({"format": "aksis-chat", "version": 1, "messages": messages}))
    return path.read_bytes()


def test_chat_history_on_a_full_disk(files, tmp_path):
    "The context file cannot grow (`ulimit -f`, as on a full disk): each turn says so on one line, the chat goes on, the old history is intact"
    history = tmp_path / "history.json"
    before = write_history(history, 6000)  # over the 4 KiB limit: any rewrite fails
    result = shell(
        f"ulimit -f 4; printf 'Once upon\\na time\\n' | aksis chat-with-model --checkpoint-path tiny.pt "
        f"--device cpu --sampler greedy --max-new-tokens 5 --context-file {history}",
        files,
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout.count("aksis> ") == 2, result.stdout  # both messages answered
    failed = f"(error: could not write {history}: File too large: this turn is not saved"
    assert result.stdout.count(failed) == 2, result.stdout
    assert history.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]  # no lock, no temp file


def on_a_full_disk(command: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    "Run `command` in `tmp_path/full`, a one-page tmpfs that history.json fills (needs root: skip otherwise); return the result and the folder's files after it; the history must be intact"
    before = write_history(tmp_path / "history.json", 100)
    full = tmp_path / "full"
    full.mkdir()
    setup = f"mount -t tmpfs -o size=4k tmpfs {full} && cp {tmp_path}/history.json {full}"
    if subprocess.run(["unshare", "--mount", "bash", "-c", setup], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root and util-linux's unshare")
    after = f"s=$?; cp {full}/history.json {tmp_path}/after.json; ls -A {full} > {tmp_path}/after.txt; exit $s"
    result = subprocess.run(
        ["unshare", "--mount", "bash", "-c", f"{setup} && cd {full} && {command}; {after}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (tmp_path / "after.json").read_bytes() == before  # the history is intact
    return result, (tmp_path / "after.txt").read_text().split()


def test_chat_lock_on_a_full_disk(files, tmp_path):
    "No room even for the lock's process id (ENOSPC on a full tmpfs): one line, status 2, no empty lock left behind"
    result, left = on_a_full_disk(
        f"aksis chat-with-model --checkpoint-path {files}/tiny.pt --device cpu --context-file history.json < /dev/null",
        tmp_path,
    )
    assert_one_line_error(
        result,
        "cannot create history.json.lock: No space left on device",
        command="chat-with-model",
    )
    assert left == ["history.json"]


def train_under_a_memory_limit(
    tmp_path: Path, kib: int, *flags: str
) -> subprocess.CompletedProcess:
    "Run `aksis train-model` on a tiny model with `flags` under `ulimit -v kib` (two threads, so the limit means the same on any machine)"
    env = {**os.environ, "AKSIS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        ["bash", "-c", f"ulimit -v {kib}; exec aksis train-model --preset tiny --max-steps 1 " + " ".join(flags)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip


def test_a_shape_that_cannot_fit(tmp_path):
    "`--max-seq-len 1000000000` under a 16 GB limit: refused before allocating, naming the flags that shrink the model"
    (tmp_path / "verse.txt").write_text("Shall I compare thee to a summer's day?\n" * 200)
    result = train_under_a_memory_limit(
        tmp_path, 16_000_000, "--dataset verse.txt", "--max-seq-len 1000000000"
    )
    assert_one_line_error(
        result, "for its weights and gradients", "lower --max-seq-len", command="train-model"
    )
    assert not (tmp_path / "checkpoints").exists()


def test_out_of_memory_while_training(tmp_path):
    "A batch that passes the estimate but not the allocator (4 GB limit, about 4.6 GB needed in fp32): one line naming what to lower"
    rng = random.Random(0)
    numbers = "\n".join(
        " ".join(str(rng.randrange(10**6)) for _ in range(12)) for _ in range(20_000)
    )
    (tmp_path / "numbers.txt").write_text(numbers)  # 1.6 MB: enough tokens for 2,000 windows
    result = train_under_a_memory_limit(
        tmp_path, 4_000_000, "--dataset numbers.txt", "--batch-size 2000", "--precision fp32"
    )
    assert_one_line_error(result, "out of memory: lower --batch-size", command="train-model")


@pytest.mark.parametrize(
    "command",
    [
        ["train-model", "--preset", "tiny"],
        ["fine-tune", "--init-from", "tiny.pt"],
        ["load-data"],
    ],
)
def test_an_empty_dataset_name(files, tmp_path, command):
    "`--dataset ''` is refused: it is not the current directory, whose stray notes.md would be trained on"
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.md").write_text("A note to self, not a corpus.\n" * 400)
    (work / "tiny.pt").symlink_to(files / "tiny.pt")
    env = {**os.environ, "AKSIS_CACHE": str(tmp_path / "cache")}
    result = run_aksis(*command, "--dataset", "", cwd=work, env=env)
    assert_one_line_error(result, "the dataset is empty", command=command[0])
    assert sorted(p.name for p in work.iterdir()) == ["notes.md", "tiny.pt"]  # no run was started


@pytest.mark.parametrize(
    "info, notice",
    [
        ({}, "never fine-tuned for chat"),
        ({"fine_tuned": {"task": "chat", "evaluation": {"well_formed": 0.4}}}, "only 40%"),
        ({"fine_tuned": {"task": "chat", "evaluation": {"well_formed": 0.97}}}, None),
    ],
)
def test_chat_warns_about_a_model_that_does_not_answer(files, tmp_path, info, notice):
    "chat-with-model says when a checkpoint was never fine-tuned for chat, or when its recorded well-formed rate is under the target"
    checkpoint = load_checkpoint(files / "tiny.pt")
    save_checkpoint(tmp_path / "chat.pt", checkpoint.model, checkpoint.tokenizer, info=info)
    result = run_aksis(
        "chat-with-model", "--checkpoint-path", "chat.pt", "--device", "cpu", cwd=tmp_path
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    warnings = [line for line in result.stdout.splitlines() if "fine-tun" in line]
    assert warnings == [] if notice is None else len(warnings) == 1 and notice in warnings[0], (
        warnings
    )
