"End-to-end runs of `aksis generate-text` and `aksis chat-with-model`, as a user would type them."

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_aksis, tiny_checkpoint

from aksis.generation import load_for_inference
from aksis.model import save_checkpoint


def readme(command: str, cwd: Path, stdin: str = "", seed: int = 0) -> subprocess.CompletedProcess:
    "Run a command as the README writes it (`python -m aksis.cli ...`, line continuations and comments included), seeded so that sampling is reproducible"
    line = command.replace("\\\n", " ").split("  #")[0].replace("python -m", f"{sys.executable} -m")
    line += f" --seed {seed}"
    return subprocess.run(
        line, shell=True, input=stdin, capture_output=True, text=True, timeout=120, cwd=cwd
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    "A directory with a tiny checkpoint at ./checkpoints/epoch_10.pt, where the README's examples look for it"
    directory = tmp_path_factory.mktemp("generation")
    texts = ["Once upon a time, the meaning of life was a tiny model."] * 3
    tiny_checkpoint(directory / "checkpoints" / "epoch_10.pt", texts, max_seq_len=256)
    return directory


def chunks(process: subprocess.Popen, timeout: float = 60) -> Iterator[bytes]:
    "Yield what the child writes to stdout, read by read, until it closes it; fail if `timeout` passes first"
    fd, deadline = process.stdout.fileno(), time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            process.kill()
            pytest.fail(f"no output from {process.args} within {timeout} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        yield chunk


def read_until(process: subprocess.Popen, expected: str, timeout: float = 60) -> str:
    "Read the child's stdout until `expected` appears; fail, showing its stderr, if it exits or `timeout` passes first"
    seen = b""
    for chunk in chunks(process, timeout):
        seen += chunk
        if expected.encode() in seen:
            return seen.decode()
    pytest.fail(f"exited before printing {expected!r}: {seen!r} {process.communicate()[1]!r}")


def start_chat(*flags: str) -> subprocess.Popen:
    "Start `aksis chat-with-model` with `flags`, its stdin, stdout and stderr piped"
    return subprocess.Popen(
        ["aksis", "chat-with-model", *flags],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


# The README's examples, as written.

README_GENERATE = [
    """python -m aksis.cli generate-text \\
    --checkpoint-path ./checkpoints/epoch_10.pt \\
    --prompt "Once upon a time" \\
    --max-new-tokens 100 \\
    --sampler top-p \\
    --top-p 0.9""",
    """python -m aksis.cli generate-text \\
    --checkpoint-path ./checkpoints/epoch_10.pt \\
    --prompt "The meaning of life is" \\
    --sampler greedy  # or top-k, top-p, temperature""",
]

README_CHAT = [
    "python -m aksis.cli chat-with-model --checkpoint-path ./checkpoints/epoch_10.pt",
    """python -m aksis.cli chat-with-model \\
    --checkpoint-path ./checkpoints/epoch_10.pt \\
    --sampler temperature \\
    --temperature 0.8 \\
    --max-new-tokens 150 \\
    --system-prompt "You are a helpful coding assistant.\"""",
    """python -m aksis.cli chat-with-model \\
    --checkpoint-path ./checkpoints/epoch_10.pt \\
    --context-file ./chat_history.json""",
]


@pytest.mark.parametrize("command", README_GENERATE)
def test_readme_generate_examples(workdir, command):
    result = readme(command, workdir)
    assert result.returncode == 0, result.stderr
    prompt = "Once upon a time" if "Once" in command else "The meaning of life is"
    assert result.stdout.startswith(prompt) and len(result.stdout) > len(prompt) + 1, result.stdout


@pytest.mark.parametrize("sampler", ["top-k", "top-p", "temperature", "beam"])
def test_readme_generate_other_samplers(workdir, sampler):
    result = readme(README_GENERATE[1].replace("greedy", sampler), workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The meaning of life is")


@pytest.mark.parametrize("command", README_CHAT)
def test_readme_chat_examples(workdir, command):
    result = readme(command, workdir, stdin="Hello there\nHow are you?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("aksis> ") == 2, result.stdout
    if "--context-file" in command:
        saved = json.loads((workdir / "chat_history.json").read_text())
        assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 2
        assert saved["messages"][0]["content"] == "Hello there"


def test_generated_text_is_streamed(workdir):
    "The text arrives in many separate pieces while the process is still generating"
    ckpt = str(workdir / "checkpoints" / "epoch_10.pt")
    flags = ["--prompt", "Once", "--sampler", "greedy", "--max-new-tokens", "1000000"]
    process = subprocess.Popen(
        ["aksis", "generate-text", "--checkpoint-path", ckpt, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    text, reads = b"", 0
    try:
        for chunk in chunks(process):
            text += chunk
            reads += len(text) > len(b"Once")  # reads that brought generated text
            if reads == 3:
                break
        still_generating = process.poll() is None
    finally:
        process.kill()
        _, err = process.communicate(timeout=60)
    assert reads == 3 and still_generating, (text, err.decode())
    assert text.startswith(b"Once"), text


def test_sampling_is_reproducible(workdir):
    "The same seed gives the same text; another seed, other text (for this model and these seeds)"
    ckpt = str(workdir / "checkpoints" / "epoch_10.pt")
    texts = {
        seed: [
            run_aksis(
                "generate-text",
                "--checkpoint-path",
                ckpt,
                "--prompt",
                "Once",
                "--max-new-tokens",
                "30",
                "--seed",
                str(seed),
            )
            for _ in range(2)
        ]
        for seed in (0, 1)
    }
    for first, second in texts.values():
        assert first.returncode == second.returncode == 0, first.stderr + second.stderr
        assert first.stdout == second.stdout and len(first.stdout) > len("Once\n"), first.stdout
    assert texts[0][0].stdout != texts[1][0].stdout


def test_chat_commands(workdir):
    ckpt = str(workdir / "checkpoints" / "epoch_10.pt")
    saved = workdir / "saved.json"
    typed = f"Hello\n/save {saved}\n/reset\n/save\n/quit\nnever read\n"
    result = run_aksis("chat-with-model", "--checkpoint-path", ckpt, "--seed", "0", stdin=typed)
    assert result.returncode == 0, result.stderr
    assert f"(saved to {saved})" in result.stdout and "(conversation cleared)" in result.stdout
    assert "(error: no file to save to" in result.stdout
    assert result.stdout.count("aksis> ") == 1
    assert [m["role"] for m in json.loads(saved.read_text())["messages"]] == ["user", "assistant"]


def test_context_file_is_resumed_and_rewritten(workdir):
    ckpt = str(workdir / "checkpoints" / "epoch_10.pt")
    history = workdir / "resume.json"
    for n in (1, 2):
        result = run_aksis(
            "chat-with-model",
            "--checkpoint-path",
            ckpt,
            "--context-file",
            str(history),
            "--seed",
            "0",
            stdin=f"Turn {n}\n",
        )
        assert result.returncode == 0, result.stderr
    assert "(continuing the conversation" in result.stdout
    messages = json.loads(history.read_text())["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Turn 1", "Turn 2"]
    assert not list(workdir.glob(".resume.json.*"))  # no temporary files left behind


CHAT_HEAD = '{"format": "aksis-chat", "version": 1, "messages": '


@pytest.mark.parametrize(
    "contents, message",
    [
        ("{not json", "not valid JSON"),
        ('{"messages": []}', "not an Aksis chat file"),
        (CHAT_HEAD + '[{"role": "wizard", "content": "hi"}]}', "unknown role"),
        (CHAT_HEAD + '[{"role": ["user"], "content": "hi"}]}', "unknown role ['user']"),
        (CHAT_HEAD + '[{"role": {"user": true}, "content": "hi"}]}', "unknown role"),
        ("[" * 100_000, "nesting too deep"),
        ('{"format": "aksis-chat", "version": ' + "1" * 5000 + "}", "a number too long"),
    ],
    ids=["json", "format", "role", "role-list", "role-object", "deep", "long-number"],
)
def test_bad_context_file_is_an_error_and_left_untouched(workdir, contents, message):
    history = workdir / "bad.json"
    history.write_text(contents)
    ckpt = str(workdir / "checkpoints" / "epoch_10.pt")
    result = run_aksis(
        "chat-with-model",
        "--checkpoint-path",
        ckpt,
        "--context-file",
        str(history),
        stdin="Hello\n",
    )
    assert_one_line_error(result, message)
    assert history.read_text() == contents
    assert not (workdir / "bad.json.lock").exists()


BAD_INPUT = [
    (["--checkpoint-path", "missing.pt"], "not found"),
    (["--checkpoint-path", "corrupt.pt"], "not a readable checkpoint"),
    (["--checkpoint-path", "checkpoints"], "is a directory: give the path of a checkpoint file ("),
    (["--prompt", ""], "prompt is empty"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be a positive integer"),
    (["--max-new-tokens", "-3"], "--max-new-tokens: must be a positive integer"),
    (["--top-p", "0"], "--top-p: must be greater than 0"),
    (["--top-p", "1.01"], "--top-p: must be in (0, 1]"),
    (["--temperature", "0"], "temperature must be greater than 0"),
    (["--sampler", "top-k", "--temperature", "-0.5"], "temperature must be greater than 0"),
    (["--sampler", "nucleus"], "invalid choice: 'nucleus'"),
    (["--top-k", "0"], "--top-k: must be a positive integer"),
    (["--lookahead", "-1"], "lookahead must be 0 (off) or more"),
    (["--seed", "-1"], "seed must be from 0 to 2**32 - 1"),
    (["--seed", str(10**23)], "seed must be from 0 to 2**32 - 1"),
    (["--sampler", "beam", "--length-penalty", "1000"], "length_penalty must be in [-10, 10]"),
    (["--sampler", "beam", "--length-penalty=-inf"], "length_penalty must be in [-10, 10]"),
    (["--sampler", "beam", "--length-penalty", "nan"], "length_penalty must be in [-10, 10]"),
]


@pytest.mark.parametrize(
    "command, flags, message",
    [
        (command, flags, message)
        for command in ("generate-text", "chat-with-model")
        for flags, message in BAD_INPUT
        if not (command == "chat-with-model" and "--prompt" in flags)  # chat has no --prompt
    ],
)
def test_bad_input_is_a_one_line_error(workdir, command, flags, message):
    (workdir / "corrupt.pt").write_bytes(b"\x80\x02 definitely not a checkpoint")
    base = ["--checkpoint-path", "checkpoints/epoch_10.pt"] + (
        ["--prompt", "Once"] if command == "generate-text" else []
    )
    result = run_aksis(command, *base, *flags, cwd=workdir, stdin="Hello\n")
    assert_one_line_error(result, message)
    assert result.stdout == ""


def test_lookahead_gives_the_same_text(workdir):
    ckpt = str(workdir / "checkpoints" / "epoch_10.pt")
    texts = [
        run_aksis(
            "generate-text",
            "--checkpoint-path",
            ckpt,
            "--prompt",
            "Once upon a time",
            "--sampler",
            "greedy",
            "--max-new-tokens",
            "80",
            *flags,
        )
        for flags in ([], ["--lookahead", "6"])
    ]
    assert all(result.returncode == 0 for result in texts), texts
    assert texts[0].stdout == texts[1].stdout
    assert len(texts[0].stdout) > len("Once upon a time\n")


def test_16_bit_generation(workdir, tmp_path, monkeypatch):
    monkeypatch.setenv("AKSIS_CACHE", str(tmp_path))  # where auto's CPU probe is cached
    ckpt = workdir / "checkpoints" / "epoch_10.pt"
    model = load_for_inference(ckpt, "cpu", precision="bf16").model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_for_inference(ckpt, "cpu").model.parameters()} == {torch.float32}
    prompt = ["--checkpoint-path", str(ckpt), "--prompt", "Once", "--device", "cpu", "--seed", "0"]
    texts = {}
    for flags in (["--precision", "bf16"], ["--mixed-precision"], ["--no-mixed-precision"], []):
        result = run_aksis("generate-text", *prompt, *flags)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("Once") and len(result.stdout) > len("Once\n")
        texts[" ".join(flags)] = result.stdout
    assert texts["--no-mixed-precision"] == texts[""]  # fp32, the default
    result = run_aksis("generate-text", *prompt, "--precision", "fp8")
    assert result.returncode == 2 and "invalid choice: 'fp8'" in result.stderr


def test_ctrl_c_at_the_prompt_leaves_quietly(workdir):
    chat = start_chat("--checkpoint-path", str(workdir / "checkpoints" / "epoch_10.pt"))
    try:
        read_until(chat, "you> ")
        chat.send_signal(signal.SIGINT)
        _, err = chat.communicate(timeout=60)
    finally:
        chat.kill()  # if it hangs (a no-op once it has exited)
    assert chat.returncode == 0, err
    assert b"Traceback" not in err


def test_inference_does_not_import_training(workdir):
    "Generating text and chatting load neither the training code nor its data, plots and progress bars"
    code = (
        "import sys, torch\n"
        "with_torch = set(sys.modules)  # torch itself imports tqdm (for torch.hub)\n"
        "from aksis.chat import Chat\n"
        "from aksis.generation import GenerationConfig, generate, load_for_inference\n"
        f"checkpoint = load_for_inference({str(workdir / 'checkpoints' / 'epoch_10.pt')!r}, 'cpu')\n"
        "config = GenerationConfig(sampler='greedy', max_new_tokens=5)\n"
        "assert generate(checkpoint.model, checkpoint.tokenizer, 'Once', config)\n"
        "Chat(checkpoint.model, checkpoint.tokenizer, config).reply('Hello')\n"
        "new = set(sys.modules) - with_torch\n"
        "heavy = {'aksis.training', 'aksis.data', 'matplotlib', 'tqdm', 'datasets'}\n"
        "loaded = {m for m in new if m in heavy or m.split('.')[0] in heavy}\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_over_long_system_prompt_is_refused_at_the_start(workdir):
    result = run_aksis(
        "chat-with-model",
        "--checkpoint-path",
        "checkpoints/epoch_10.pt",
        "--system-prompt",
        "You are a helpful assistant. " * 100,
        cwd=workdir,
        stdin="Hello\n",
    )
    assert_one_line_error(result, "shorten it")
    assert result.stdout == ""


def test_a_context_file_is_held_by_one_chat(workdir):
    ckpt = str(workdir / "checkpoints" / "epoch_10.pt")
    history, lock = workdir / "shared.json", workdir / "shared.json.lock"
    first = start_chat("--checkpoint-path", ckpt, "--context-file", str(history), "--seed", "0")
    try:
        read_until(first, "you> ")
        assert lock.read_text() == str(first.pid)
        second = run_aksis(
            "chat-with-model",
            "--checkpoint-path",
            ckpt,
            "--context-file",
            str(history),
            stdin="Hi\n",
        )
        assert_one_line_error(second, f"is in use by another chat (process {first.pid})")
        first.communicate(b"Hello\n", timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0 and not lock.exists()
    assert [m["content"] for m in json.loads(history.read_text())["messages"]][0] == "Hello"


def test_a_stale_lock_is_taken_over(workdir):
    history, lock = workdir / "stale.json", workdir / "stale.json.lock"
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    lock.write_text(ended.stdout.decode().strip())  # left by a chat killed outright
    result = run_aksis(
        "chat-with-model",
        "--checkpoint-path",
        str(workdir / "checkpoints" / "epoch_10.pt"),
        "--context-file",
        str(history),
        "--seed",
        "0",
        stdin="Hello\n",
    )
    assert result.returncode == 0, result.stderr
    assert history.exists() and not lock.exists()


def test_a_read_only_context_file_is_refused(workdir):
    history = workdir / "read_only.json"
    history.write_text('{"format": "aksis-chat", "version": 1, "messages": []}')
    history.chmod(0o444)
    result = run_aksis(
        "chat-with-model",
        "--checkpoint-path",
        str(workdir / "checkpoints" / "epoch_10.pt"),
        "--context-file",
        str(history),
        stdin="Hello\n",
    )
    assert_one_line_error(result, "is read-only")
    assert json.loads(history.read_text())["messages"] == []


def test_chat_notes_a_model_never_fine_tuned_for_chat(workdir):
    "A pretrained-only checkpoint gets a one-line notice suggesting `aksis fine-tune`; a chat fine-tuned one does not"
    ckpt = workdir / "checkpoints" / "epoch_10.pt"
    result = run_aksis(
        "chat-with-model", "--checkpoint-path", str(ckpt), "--seed", "0", stdin="/quit\n"
    )
    assert result.returncode == 0, result.stderr
    [notice] = [line for line in result.stdout.splitlines() if "never fine-tuned" in line]
    assert f"aksis fine-tune --init-from {ckpt}" in notice
    tuned = load_for_inference(ckpt, "cpu")
    save_checkpoint(workdir / "tuned.pt", tuned.model, tuned.tokenizer,
                    info={"fine_tuned": {"task": "chat"}})  # fmt: skip
    result = run_aksis(
        "chat-with-model", "--checkpoint-path", str(workdir / "tuned.pt"), stdin="/quit\n"
    )
    assert result.returncode == 0, result.stderr
    assert "never fine-tuned" not in result.stdout
