"End-to-end runs of `aksis fine-tune`: chat fine-tuning from an Aksis checkpoint and from a local GPT-2, resuming, and bad input."

import json

import pytest
import torch
from conftest import assert_one_line_error, run_aksis, write_tiny_gpt2

from aksis.model import load_checkpoint

VERSE = (
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
    "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date;\n"
)
TURN = [
    {"role": "system", "content": "Thou art a sonnet."},
    {"role": "user", "content": "Shall I compare thee to a summer's day?"},
    {"role": "assistant", "content": "Thou art more lovely and more temperate."},
]


@pytest.fixture(scope="module")
def base(tmp_path_factory, env):
    "A tiny Aksis checkpoint trained for two steps"
    work = tmp_path_factory.mktemp("base")
    (work / "sonnets.txt").write_text(VERSE * 80)
    result = run_aksis("train-model", "--dataset", str(work / "sonnets.txt"), "--preset", "tiny",
                   "--device", "cpu", "--max-steps", "2", "--checkpoint-dir", str(work / "ckpt"),
                   env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return work / "ckpt" / "best.pt"


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    "A .jsonl file of twelve conversations"
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text((json.dumps({"messages": TURN}) + "\n") * 12)
    return path


def tune(start, data, ckpts, *extra):
    "Flags of a small, fast fine-tuning run"
    return ["fine-tune", "--init-from", str(start), "--dataset", str(data), "--device", "cpu",
            "--batch-size", "2", "--warmup-steps", "1", "--eval-every", "2", "--precision", "fp32",
            "--checkpoint-dir", str(ckpts), *extra]  # fmt: skip


def test_fine_tune_and_resume_equals_straight_run(base, chats, tmp_path, env, monkeypatch):
    from aksis.finetune import fine_tune, resume_fine_tune

    monkeypatch.setenv("AKSIS_CACHE", env["AKSIS_CACHE"])
    settings = dict(device="cpu", batch_size=2, warmup_steps=1, eval_every=2, max_steps=4,
                    precision="fp32")  # fmt: skip
    straight = fine_tune(str(base), str(chats), checkpoint_dir=str(tmp_path / "a"), **settings)
    straight.fit()
    paused = fine_tune(str(base), str(chats), checkpoint_dir=str(tmp_path / "b"), **settings)
    paused.fit(stop_at=2)
    resumed = resume_fine_tune(tmp_path / "b" / "latest.pt")
    resumed.fit()
    assert resumed.history == straight.history
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    info = load_checkpoint(tmp_path / "b" / "latest.pt").info["fine_tuned"]
    assert info == {"task": "chat", "init_from": str(base), "dataset": str(chats)}


def test_cli_fine_tunes_and_resumes(base, chats, tmp_path, env):
    result = run_aksis(*tune(base, chats, tmp_path, "--max-steps", "2"), env=env)
    assert result.returncode == 0, result.stderr
    assert "step 2/2: train loss" in result.stdout, result.stdout
    result = run_aksis("fine-tune", "--resume", "--checkpoint-dir", str(tmp_path), "--max-steps", "3",
                   env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(tmp_path / "latest.pt").train_state["step"] == 3


def test_train_model_refuses_to_resume_a_chat_fine_tune(base, chats, tmp_path, env):
    assert run_aksis(*tune(base, chats, tmp_path, "--max-steps", "1"), env=env).returncode == 0
    result = run_aksis("train-model", "--resume", str(tmp_path / "latest.pt"), env=env)
    assert_one_line_error(result, "aksis fine-tune --resume")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    "A small random GPT-2 and a tokenizer without chat tokens, as `save_pretrained` writes them"
    directory = tmp_path_factory.mktemp("gpt2")
    model, tokenizer = write_tiny_gpt2(
        directory, VERSE, tokenizer_size=298, model_vocab=300, n_layer=1, n_positions=64
    )
    return directory, model, tokenizer


def test_fine_tune_from_a_local_gpt2_directory(gpt2_dir, chats, tmp_path, env):
    directory, hf_model, tokenizer = gpt2_dir
    from aksis.finetune import load_start

    start = load_start(str(directory))  # before fine-tuning: the same logits as transformers
    ids = torch.tensor([tokenizer.encode(VERSE).ids[:60]])
    with torch.no_grad():
        ours, theirs = start.model.eval()(ids)[0][..., :300], hf_model(ids).logits
    assert start.model.config.vocab_size > 300  # grown for the chat tokens
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    result = run_aksis(*tune(directory, chats, tmp_path, "--max-steps", "2"), env=env)
    assert result.returncode == 0, result.stderr
    tuned = load_checkpoint(tmp_path / "best.pt")
    assert tuned.info["fine_tuned"]["init_from"] == str(directory)
    assert tuned.tokenizer.token_to_id("<|end|>") is not None
    assert tuned.config.vocab_size >= tuned.tokenizer.get_vocab_size() == 298 + 5  # chat tokens


BAD_LINES = {
    "json": ("{not json", "line 2: not valid JSON"),
    "no-messages": ('{"text": "hi"}', 'line 2: no "messages" list'),
    "role": ('{"messages": [{"role": "bot", "content": "hi"}]}', "line 2: message 1: unknown role"),
    "empty": ('{"messages": []}', "line 2: an empty conversation"),
    "no-assistant": ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: no assistant"),
}


@pytest.mark.parametrize("line, message", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_bad_jsonl_is_one_line_and_writes_nothing(base, tmp_path, env, line, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": TURN}) + "\n" + line + "\n")
    result = run_aksis(*tune(base, data, tmp_path / "out", "--max-steps", "1"), env=env)
    assert_one_line_error(result, f"{data}, {message}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "make_start, message",
    [
        (lambda d: d / "missing.pt", "not found"),
        (lambda d: (d / "junk.pt").write_bytes(b"not a checkpoint") and d / "junk.pt", "not a readable checkpoint"),
        (lambda d: (d / "state.pt", torch.save({"w": torch.ones(1)}, d / "state.pt"))[0], "not an Aksis checkpoint"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "without config.json"),
    ],
    ids=["missing", "junk", "state-dict", "directory"],
)  # fmt: skip
def test_bad_start_is_one_line_and_writes_nothing(chats, tmp_path, env, make_start, message):
    result = run_aksis(*tune(make_start(tmp_path), chats, tmp_path / "out"), env=env)
    assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists()


def test_uncached_hub_dataset_offline_is_one_line(base, tmp_path, env):
    empty_cache = {**env, "HF_HOME": str(tmp_path / "hf")}  # HF_HUB_OFFLINE=1: datasets' cache only
    result = run_aksis(*tune(base, "someone/chats", tmp_path / "out"), env=empty_cache)
    assert_one_line_error(
        result,
        "cannot load dataset 'someone/chats': it is not in the local cache and HF_HUB_OFFLINE is set",
    )
    assert not (tmp_path / "out").exists()


def test_gpt2_offline_fails_fast(chats, tmp_path, env):
    result = run_aksis(*tune("gpt2", chats, tmp_path / "out"), env=env)
    assert_one_line_error(result, "HF_HUB_OFFLINE")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "dataset, persona, message",
    [
        ("shakespeare-chat", "NOBODY", "NOBODY"),
        ("chats", "HAMLET", "--persona applies only to --dataset shakespeare-chat"),
    ],
)
def test_bad_persona_is_one_line(base, chats, tmp_path, env, dataset, persona, message):
    data = chats if dataset == "chats" else dataset
    result = run_aksis(*tune(base, data, tmp_path / "out", "--persona", persona), env=env)
    assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists()


def test_missing_flags_and_contradictions(base, chats, tmp_path, env):
    assert_one_line_error(
        run_aksis("fine-tune", "--dataset", str(chats), env=env), "--init-from needed"
    )
    assert_one_line_error(
        run_aksis("fine-tune", "--resume", "x.pt", "--init-from", str(base), env=env),
        "give only one",
    )
    assert_one_line_error(
        run_aksis("fine-tune", "--resume", str(base), env=env), "not a fine-tuning run"
    )
