"""The chat widget as a person uses it: a real JupyterLab, a real browser (Chromium driven by Playwright).

Needs JupyterLab, the `playwright` package and a system Chromium (Debian: `apt-get install chromium`;
or set AKSIS_CHROMIUM to a Chrome or Chromium binary). Without them it skips, or fails where
AKSIS_REQUIRE_BROWSER is set (CI). Set AKSIS_WIDGET_SCREENSHOT to a PNG path to keep the screenshot
(nbs/images/widget.png is the picture on the widget's docs page)."""

import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from aksis.chat import Message, render
from aksis.core import model_config
from aksis.model import GPT, save_checkpoint
from aksis.tokenizer import train_tokenizer
from aksis.training import simple_train

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STORY = (
    "Once upon a time a tiny model lived in a notebook. Every day it read the same few lines, "
    "and every night it dreamed of longer ones. One morning a user asked for a story, and it "
    "began to tell this one, slowly, word by word, until somebody pressed Stop."
)
TALKS = [
    [
        Message("user", "Hello"),
        Message("assistant", "Hello! I am a tiny model. Ask me for a story."),
    ],
    [Message("user", "Tell me a story"), Message("assistant", STORY)],
    [Message("user", "How are you?"), Message("assistant", "Very well, thank you.")],
]
# The notebook the browser runs: a model slowed to ~30 tokens a second, so streaming and Stop can be watched.
CELL = """\
import time
from aksis.generation import GenerationConfig
from aksis.widget import ChatWidget

chat_widget = ChatWidget("tiny.pt", device="cpu", config=GenerationConfig(sampler="greedy", max_new_tokens=64))
chat_widget.chat.model.register_forward_pre_hook(lambda *_: time.sleep(0.03))
chat_widget.history.layout.max_height = "260px"
chat_widget"""


def unavailable(reason: str) -> None:
    "Skip the browser test, or fail it where it must run (AKSIS_REQUIRE_BROWSER)"
    if os.environ.get("AKSIS_REQUIRE_BROWSER"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def chromium() -> str:
    "A Chromium or Chrome binary: AKSIS_CHROMIUM, else the first on PATH; and playwright and JupyterLab"
    for module in ("playwright", "jupyterlab"):
        try:
            __import__(module)
        except ImportError:
            unavailable(f"the browser test needs {module}: pip install {module}")
    names = ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
    found = os.environ.get("AKSIS_CHROMIUM") or next(filter(None, map(shutil.which, names)), None)
    if found is None:
        unavailable("no Chromium found: apt-get install chromium, or set AKSIS_CHROMIUM")
    return str(found)


def write_checkpoint(path: Path) -> None:
    "A tiny model taught three short conversations, met in random order (seconds on a CPU)"
    tokenizer = train_tokenizer([m.content for talk in TALKS for m in talk] * 3, vocab_size=400)
    torch.manual_seed(0)
    rng = random.Random(0)
    talks = [talk for _ in range(30) for talk in rng.sample(TALKS, len(TALKS))]
    ids = torch.tensor([i for talk in talks for i in render(tokenizer, talk)])
    model = GPT(model_config("tiny", vocab_size=tokenizer.get_vocab_size()))
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # a model this small trains faster on one thread, and busy CPUs hurt it less
    try:
        simple_train(model, ids, steps=200)
    finally:
        torch.set_num_threads(threads)
    save_checkpoint(path, model.eval(), tokenizer)


TOKEN = secrets.token_hex(16)  # of the JupyterLab the test starts


def api(url: str, path: str) -> urllib.request.Request:
    "A GET request to JupyterLab's REST API"
    return urllib.request.Request(f"{url}/api/{path}", headers={"Authorization": f"token {TOKEN}"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path: Path) -> Iterator[str]:
    "The URL of a JupyterLab serving `tmp_path`, with fresh settings; it and its kernels end after the test"
    import nbformat

    write_checkpoint(tmp_path / "tiny.pt")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(CELL)])
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(notebook, tmp_path / "chat.ipynb")
    home = tmp_path / "jupyter"
    settings = {
        "@jupyter-widgets/jupyterlab-manager/plugin": {"saveState": True},
        "@jupyterlab/apputils-extension/notification": {
            "fetchNews": "false",
            "checkForUpdates": False,
        },
    }
    for name, value in settings.items():
        path = home / "settings" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    env = os.environ | {
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "OMP_NUM_THREADS": "1",  # the kernel's tiny model, as above
    }
    port, log = free_port(), (tmp_path / "jupyterlab.log").open("w")
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1"]
    command += [
        f"--port={port}",
        f"--IdentityProvider.token={TOKEN}",
        f"--ServerApp.root_dir={tmp_path}",
    ]
    command += ["--allow-root"]  # CI containers run as root
    server = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "jupyterlab.log").read_text()
            assert time.monotonic() < deadline, "JupyterLab did not start in 60 s"
            try:
                urllib.request.urlopen(api(url, "status"), timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # the server and the kernels it started
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()


def poll(
    condition: Callable[[], object], timeout: float, what: str, seen: Callable[[], str]
) -> None:
    "Wait until `condition()` is true; on a timeout, the failure shows `seen()`"
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"not within {timeout} s: {what}; {seen()!r}"
        time.sleep(0.02)


IN_VIEW = """h => {
    const blocks = h.querySelectorAll('.widget-html-content > div');
    const box = h.getBoundingClientRect(), first = blocks[0].getBoundingClientRect();
    const last = blocks[blocks.length - 1].getBoundingClientRect();
    return {overflows: h.scrollHeight > h.clientHeight + 20,
            oldest: first.top >= box.top - 2 && first.top < box.bottom,
            newest: last.bottom <= box.bottom + 2 && last.bottom > box.top};
}"""


def test_chat_in_jupyterlab(chromium: str, jupyterlab: str, tmp_path: Path) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    begin = time.monotonic()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1000, "height": 1000})
        page.set_default_timeout(60_000)  # generous: a busy machine can stall the page
        page.goto(f"{jupyterlab}/lab/tree/chat.ipynb?token={TOKEN}")
        console = []
        page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))

        def settled() -> None:
            "Wait for the kernel to be connected and idle, and the page to finish restoring"
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(
                timeout=60_000
            )
            page.wait_for_load_state("networkidle")

        settled()

        def menu(title: str, item: str) -> None:
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{title}$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{item}$")).click()

        ran = page.locator(".jp-InputPrompt", has_text=re.compile(r"\[[*0-9]+\]"))
        deadline = time.monotonic() + 120
        # A command given while the page settles, or while JupyterLab swaps in a fresh kernel
        # (it can start a second one at load), is lost: give it again until a cell runs.
        while not ran.count():
            assert time.monotonic() < deadline, f"no cell ran; the console: {console[-20:]}"
            if page.locator(".jp-Dialog").count():  # "Select Kernel": the default is right
                page.locator(".jp-Dialog .jp-mod-accept").click()
            settled()
            menu("Run", "Run All Cells")
            with contextlib.suppress(PlaywrightTimeout):
                ran.wait_for(timeout=5_000)
        chat = page.locator(".aksis-chat")
        box, history = chat.locator(".aksis-message input"), chat.locator(".aksis-history")
        send_button = chat.get_by_role("button", name="Send", exact=True)
        stop_button = chat.get_by_role("button", name="Stop", exact=True)
        try:
            box.wait_for(timeout=90_000)
        except PlaywrightTimeout:
            prompts = page.locator(".jp-InputPrompt").all_inner_texts()
            outputs = page.locator(".jp-OutputArea").all_inner_texts()
            pytest.fail(
                f"no chat widget: prompts {prompts}, outputs {outputs}, console {console[-20:]}"
            )

        def until(condition: Callable[[], object], timeout: float, what: str) -> None:
            poll(condition, timeout, what, chat.inner_text)

        def send(text: str) -> None:
            box.click()
            box.press_sequentially(text)
            box.press("Enter")

        def started(turns: int) -> bool:
            "Whether the history shows the `turns`-th reply, being written or written"
            return history.inner_text().count("\nassistant\n") >= turns

        # The reply streams in, and the box has the focus again when it ends.
        send("Hello")
        until(lambda: started(1), 10, "the message is shown with the reply to come")
        seen: list[str] = []  # the history, observed until Send is back
        until(lambda: seen.append(history.inner_text()) or send_button.is_visible(), 15, "a reply")
        assert "Ask me for a story." in history.inner_text()
        growing = [t for t in dict.fromkeys(seen) if "Hello" in t and "assistant" in t]
        assert len(growing) >= 3, growing
        assert box.evaluate("b => document.activeElement === b")

        # A draft is not sent when the box loses focus.
        draft = "half-typed draft"
        box.press_sequentially(draft)
        history.click()
        time.sleep(1)
        assert draft not in history.inner_text() and box.input_value() == draft
        box.fill("")

        # HTML in a message is shown as text.
        send("<b>bold</b>")
        until(lambda: started(2) and send_button.is_visible(), 10, "a reply to <b>bold</b>")
        assert "<b>bold</b>" in history.inner_text()
        assert history.locator("b", has_text="bold").count() == 0

        # Stop ends a long reply at once, keeping it, marked as stopped.
        send("Tell me a story")
        until(lambda: started(3) and "Once upon" in history.inner_text(), 10, "the story begins")
        stop_button.click()
        until(send_button.is_visible, 5, "Send is back after Stop")
        text = history.inner_text()
        time.sleep(0.5)
        assert history.inner_text() == text, text  # nothing more came
        assert text.count("[stopped]") == 1 and "somebody pressed Stop" not in text
        assert box.evaluate("b => document.activeElement === b")

        # So does Kernel ▸ Interrupt (JupyterLab runs widget callbacks on a subshell by default).
        send("Tell me a story")
        until(lambda: history.inner_text().count("Once upon") == 2, 10, "the second story begins")
        menu("Kernel", "Interrupt Kernel")
        until(send_button.is_visible, 5, "Send is back after Kernel ▸ Interrupt")
        assert history.inner_text().count("[stopped]") == 2, history.inner_text()

        # The history shows its newest line.
        view = history.evaluate(IN_VIEW)
        assert view == {"overflows": True, "oldest": False, "newest": True}, view
        chat.screenshot(path=os.environ.get("AKSIS_WIDGET_SCREENSHOT") or tmp_path / "widget.png")

        # Unless the user has scrolled up to read.
        history.evaluate("h => h.scrollTop = -h.scrollHeight")
        send("How are you?")
        until(lambda: started(5) and send_button.is_visible(), 10, "a reply to How are you?")
        view = history.evaluate(IN_VIEW)
        assert view == {"overflows": True, "oldest": True, "newest": False}, view

        # Saved with its state and reloaded, the page still talks to the same widget.
        menu("File", "Save Notebook")

        def saved() -> bool:
            try:
                return "widgets" in json.loads((tmp_path / "chat.ipynb").read_text())["metadata"]
            except json.JSONDecodeError:  # being written
                return False

        until(saved, 10, "the notebook is saved with the widget state")
        page.reload()
        box.wait_for(timeout=90_000)
        settled()
        assert "[stopped]" in history.inner_text()
        send("Hello")
        until(
            lambda: started(6) and send_button.is_visible(),
            15,
            f"a reply after reloading; the console: {console}",
        )
        browser.close()
    print(f"browser test: {time.monotonic() - begin:.0f} s in the browser")
