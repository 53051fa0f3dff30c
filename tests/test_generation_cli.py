"End-to-end runs of `aksis generate-text` and `aksis chat-with-model`, as a user would type them."

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aksis.core import model_config
from aksis.model import GPT
from aksis.tokenizer import train_tokenizer
from aksis.training import save_checkpoint


def aksis_cli(*args: str, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess:
    "Run the installed `aksis` script with `args`, typing `stdin`, capturing its output"
    return subprocess.run(
        ["aksis", *args], input=stdin, capture_output=True, text=True, timeout=120, cwd=cwd
    )


def readme(command: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    "Run a command exactly as the README writes it (`python -m aksis.cli ...`, line continuations and comments included)"
    line = command.replace("\\\n", " ").split("  #")[0].replace("python -m", f"{sys.executable} -m")
    return subprocess.run(
        line, shell=True, input=stdin, capture_output=True, text=True, timeout=120, cwd=cwd
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    "A directory with a tiny checkpoint at ./checkpoints/epoch_10.pt, where the README's examples look for it"
    torch.manual_seed(0)
    tokenizer = train_tokenizer(
        ["Once upon a time, the meaning of life was a tiny model."] * 3, vocab_size=300
    )
    model = GPT(model_config("tiny", vocab_size=tokenizer.get_vocab_size(), max_seq_len=256))
    directory = tmp_path_factory.mktemp("generation")
    save_checkpoint(directory / "checkpoints" / "epoch_10.pt", model, tokenizer)
    return directory


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


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


def test_generated_text_is_streamed_and_reproducible(workdir):
    ckpt = str(workdir / "checkpoints" / "epoch_10.pt")
    args = [
        "generate-text",
        "--checkpoint-path",
        ckpt,
        "--prompt",
        "Once",
        "--seed",
        "3",
        "--max-new-tokens",
        "30",
    ]
    first, second = aksis_cli(*args), aksis_cli(*args)
    assert first.returncode == 0 and first.stdout == second.stdout
    other = aksis_cli(*args[:-4], "--seed", "4", "--max-new-tokens", "30", "--temperature", "2")
    assert other.returncode == 0


def test_chat_commands(workdir):
    ckpt = str(workdir / "checkpoints" / "epoch_10.pt")
    saved = workdir / "saved.json"
    typed = f"Hello\n/save {saved}\n/reset\n/save\n/quit\nnever read\n"
    result = aksis_cli("chat-with-model", "--checkpoint-path", ckpt, "--seed", "0", stdin=typed)
    assert result.returncode == 0, result.stderr
    assert f"(saved to {saved})" in result.stdout and "(conversation cleared)" in result.stdout
    assert "(error: no file to save to" in result.stdout
    assert result.stdout.count("aksis> ") == 1
    assert [m["role"] for m in json.loads(saved.read_text())["messages"]] == ["user", "assistant"]


def test_context_file_is_resumed_and_rewritten(workdir):
    ckpt = str(workdir / "checkpoints" / "epoch_10.pt")
    history = workdir / "resume.json"
    for n in (1, 2):
        result = aksis_cli(
            "chat-with-model",
            "--checkpoint-path",
            ckpt,
            "--context-file",
            str(history),
            stdin=f"Turn {n}\n",
        )
        assert result.returncode == 0, result.stderr
    assert "(continuing the conversation" in result.stdout
    messages = json.loads(history.read_text())["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Turn 1", "Turn 2"]
    assert not list(workdir.glob(".resume.json.*"))  # no temporary files left behind


@pytest.mark.parametrize(
    "contents, message",
    [
        ("{not json", "not valid JSON"),
        ('{"messages": []}', "not an Aksis chat file"),
        (
            '{"format": "aksis-chat", "version": 1, "messages": [{"role": "wizard", "content": "hi"}]}',
            "unknown role",
        ),
    ],
)
def test_bad_context_file_is_an_error_and_left_untouched(workdir, contents, message):
    history = workdir / "bad.json"
    history.write_text(contents)
    ckpt = str(workdir / "checkpoints" / "epoch_10.pt")
    result = aksis_cli(
        "chat-with-model",
        "--checkpoint-path",
        ckpt,
        "--context-file",
        str(history),
        stdin="Hello\n",
    )
    assert_one_line_error(result, message)
    assert history.read_text() == contents


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--checkpoint-path", "missing.pt"], "not found"),
        (["--checkpoint-path", "corrupt.pt"], "not a readable checkpoint"),
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
    ],
)
@pytest.mark.parametrize("command", ["generate-text", "chat-with-model"])
def test_bad_input_is_a_one_line_error(workdir, command, flags, message):
    if command == "chat-with-model" and "--prompt" in flags:
        return  # chat has no --prompt
    (workdir / "corrupt.pt").write_bytes(b"\x80\x02 definitely not a checkpoint")
    base = ["--checkpoint-path", "checkpoints/epoch_10.pt"] + (
        ["--prompt", "Once"] if command == "generate-text" else []
    )
    result = aksis_cli(command, *base, *flags, cwd=workdir, stdin="Hello\n")
    assert_one_line_error(result, message)
    assert result.stdout == ""


def test_lookahead_gives_the_same_text(workdir):
    ckpt = str(workdir / "checkpoints" / "epoch_10.pt")
    texts = [
        aksis_cli(
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


def test_half_precision_generation(workdir):
    ckpt = str(workdir / "checkpoints" / "epoch_10.pt")
    result = aksis_cli(
        "generate-text",
        "--checkpoint-path",
        ckpt,
        "--prompt",
        "Once",
        "--mixed-precision",
        "--seed",
        "0",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Once")


def test_ctrl_c_at_the_prompt_leaves_quietly(workdir):
    ckpt = str(workdir / "checkpoints" / "epoch_10.pt")
    chat = subprocess.Popen(
        ["aksis", "chat-with-model", "--checkpoint-path", ckpt],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = ""
    while not seen.endswith("you> "):  # wait for the prompt
        seen += chat.stdout.read(1)
    chat.send_signal(signal.SIGINT)
    out, err = chat.communicate(timeout=60)
    assert chat.returncode == 0, err
    assert "Traceback" not in err
