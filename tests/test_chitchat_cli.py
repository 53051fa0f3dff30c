"End-to-end runs on the built-in `chitchat` set, as a user would type them: pretraining on its text with the chat tokens, `load-data`, and chat fine-tuning on its conversations."

import json

import pytest
from conftest import run_aksis

from aksis.finetune import CHAT_MEASURES
from aksis.model import load_checkpoint
from aksis.tokenizer import SPECIAL_TOKENS, save_tokenizer


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, env):
    "A tiny model trained for two steps on the chit-chat's text, with a tokenizer trained on it"
    ckpts = tmp_path_factory.mktemp("pretrained")
    result = run_aksis("train-model", "--dataset", "chitchat", "--preset", "tiny", "--device", "cpu",
                   "--max-steps", "2", "--batch-size", "16", "--checkpoint-dir", str(ckpts),
                   env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return ckpts / "best.pt"


def test_train_model_learns_the_text_between_the_chat_tokens(pretrained):
    "The tokenizer trained for `train-model --dataset chitchat` has the chat tokens, and no merges made of their pieces"
    tokenizer = load_checkpoint(pretrained).tokenizer
    pieces = [
        t for t in tokenizer.get_vocab() if ("<|" in t or "|>" in t) and t not in SPECIAL_TOKENS
    ]
    assert pieces == [], pieces


def test_load_data_shows_the_splits_and_the_chat_tokens(pretrained, tmp_path, env):
    "`load-data` with the pretrained model's tokenizer, whose token streams are cached: the splits, and windows with turns"
    tokenizer = save_tokenizer(load_checkpoint(pretrained).tokenizer, tmp_path / "tokenizer.json")
    result = run_aksis("load-data", "--dataset", "chitchat", "--tokenizer-path", str(tokenizer),
                   "--max-length", "64", "--batch-size", "2", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[2:5] if line}
    assert rows == {"split": "documents", "train": "6,452", "validation": "716"}, result.stdout
    windows = result.stdout.split("--- window 1 of 2 ---")[1]
    assert "<|user|>" in windows or "<|assistant|>" in windows, windows


def test_fine_tune_on_the_conversations(pretrained, tmp_path, env):
    "`fine-tune --dataset chitchat` is chat fine-tuning, and the checkpoint says so, with its chat evaluation at the end"
    result = run_aksis("fine-tune", "--init-from", str(pretrained), "--dataset", "chitchat",
                   "--device", "cpu", "--max-steps", "2", "--batch-size", "16", "--warmup-steps", "1",
                   "--eval-every", "2", "--precision", "fp32", "--checkpoint-dir", str(tmp_path),
                   env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "step 2/2: train loss" in result.stdout, result.stdout
    info = load_checkpoint(tmp_path / "best.pt").info["fine_tuned"]
    evaluation = info.pop("evaluation")
    assert info == {"task": "chat", "init_from": str(pretrained), "dataset": "chitchat"}
    assert evaluation["prompts"] == 100 and 0 <= evaluation["well_formed"] <= 1, evaluation
    assert f"chat evaluation of {tmp_path / 'best.pt'}, 100 held-out prompts" in result.stdout
    for line in ["context gain", "duplicate replies", "distinct-2", "identity, modern phrasing"]:
        assert line in result.stdout, result.stdout
    history = tmp_path / "chat_history.json"  # the README's third command: talk to it
    chat = run_aksis("chat-with-model", "--checkpoint-path", str(tmp_path / "best.pt"),
                     "--context-file", str(history), "--seed", "0", stdin="Hello! Who are you?\n", env=env)  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert "never fine-tuned" not in chat.stdout + chat.stderr
    saved = json.loads(history.read_text())["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant"], saved


def test_eval_chat(pretrained, tmp_path, env):
    "`eval-chat` on a checkpoint never fine-tuned evaluates on chitchat's held-out conversations, and writes nothing"
    before = pretrained.read_bytes()
    result = run_aksis("eval-chat", "--checkpoint-path", str(pretrained), "--prompts", "4",
                   "--device", "cpu", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{pretrained} on 4 held-out prompts of chitchat, seed 0:")
    report = result.stdout.splitlines()[1:]
    assert [line[:27].strip() for line in report] == [name for name, _, _ in CHAT_MEASURES.values()]
    assert float(report[0].split()[4]) > 0, report[0]  # "loss on assistant tokens 6.210 nats/token"
    assert pretrained.read_bytes() == before
