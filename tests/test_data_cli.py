"End-to-end runs of `aksis tokenize` and `aksis load-data`, as a user would type them."

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_aksis

SHARED_WIKITEXT = Path(__file__).parents[2] / "shared" / "data" / "wikitext-2"
SONNET = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    "An empty Aksis cache directory for one test"
    return tmp_path / "cache"


def aksis(cache: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    "Run the installed `aksis` script with `args` and `AKSIS_CACHE=cache`"
    return run_aksis(*args, env={**os.environ, "AKSIS_CACHE": str(cache), **env})


def assert_no_partial_files(cache: Path) -> None:
    "No temporary files left behind by an interrupted write"
    assert not list(cache.rglob("*.tmp")), list(cache.rglob("*.tmp"))


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    "A small tokenizer.json trained on a sonnet"
    from aksis.tokenizer import save_tokenizer, train_tokenizer

    return save_tokenizer(
        train_tokenizer([SONNET * 20], 320), tmp_path_factory.mktemp("tok") / "tokenizer.json"
    )


@pytest.fixture
def sonnet(tmp_path: Path) -> Path:
    path = tmp_path / "sonnet.txt"
    path.write_text(SONNET * 40)
    return path


# aksis tokenize


def test_tokenize_with_a_tokenizer_file(cache: Path, tokenizer_file: Path):
    result = aksis(
        cache,
        "tokenize",
        "--text",
        "Shall I compare thee? 🌹",
        "--tokenizer-path",
        str(tokenizer_file),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "tokens for 23 characters" in lines[0], lines[0]
    assert "'Shall'" in result.stdout and "b'\\xf0" in result.stdout
    assert lines[-1].startswith("ids: ")
    assert not cache.exists(), "a given tokenizer needs no cache"


def test_tokenize_default_tokenizer_is_trained_once_and_cached(cache: Path):
    first = aksis(cache, "tokenize", "--text", "Hello, world! This is Aksis.")
    assert first.returncode == 0, first.stderr
    assert "vocabulary of 4,096" in first.stdout and "' world'" in first.stdout
    (trained,) = (cache / "tokenizers").glob("shakespeare-4096-*.json")
    written = trained.stat().st_mtime_ns
    second = aksis(cache, "tokenize", "--text", "Hello, world! This is Aksis.")
    assert second.stdout == first.stdout
    assert list((cache / "tokenizers").glob("shakespeare-4096-*.json")) == [trained]
    assert trained.stat().st_mtime_ns == written  # read, not trained and written again


def test_tokenize_with_a_checkpoint(cache: Path, tmp_path: Path, tokenizer_file: Path):
    from aksis.core import model_config
    from aksis.model import GPT, save_checkpoint
    from aksis.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_file)
    model = GPT(model_config("tiny", vocab_size=tok.get_vocab_size()))
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(checkpoint, model, tok)
    from_checkpoint = aksis(
        cache, "tokenize", "--text", "Shall I", "--checkpoint-path", str(checkpoint)
    )
    from_file = aksis(
        cache, "tokenize", "--text", "Shall I", "--tokenizer-path", str(tokenizer_file)
    )
    assert from_checkpoint.returncode == 0, from_checkpoint.stderr
    assert from_checkpoint.stdout == from_file.stdout


def test_tokenize_bad_input(cache: Path, tmp_path: Path, tokenizer_file: Path):
    missing = str(tmp_path / "missing.json")
    assert_one_line_error(
        aksis(cache, "tokenize", "--text", "hi", "--tokenizer-path", missing),
        "not found",
        command="tokenize",
    )
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{ this is not json")
    assert_one_line_error(
        aksis(cache, "tokenize", "--text", "hi", "--tokenizer-path", str(corrupt)),
        "not a valid tokenizer.json",
        command="tokenize",
    )
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    assert_one_line_error(
        aksis(cache, "tokenize", "--text", "hi", "--checkpoint-path", str(garbage)),
        "garbage.pt",
        command="tokenize",
    )
    assert_one_line_error(
        aksis(
            cache,
            "tokenize",
            "--text",
            "hi",
            "--tokenizer-path",
            str(tokenizer_file),
            "--checkpoint-path",
            str(garbage),
        ),
        "not both",
        command="tokenize",
    )
    result = aksis(cache, "tokenize")
    assert result.returncode == 2 and "--text" in result.stderr


# aksis load-data


def test_load_data_text_file(cache: Path, sonnet: Path):
    result = aksis(
        cache, "load-data", "--dataset", str(sonnet), "--batch-size", "3", "--max-length", "16"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert (
        "train " in out
        and "validation " in out
        and "chars/token" in out
        and "tokens per document" in out
    )
    assert "x (3, 16) and y (3, 16)" in out and "--- window 3 of 3 ---" in out
    streams = sorted((cache / "tokens").glob("*.bin"))
    assert len(streams) == 2
    mtimes = [p.stat().st_mtime_ns for p in streams]
    again = aksis(
        cache, "load-data", "--dataset", str(sonnet), "--batch-size", "3", "--max-length", "16"
    )
    assert again.stdout == out
    assert [p.stat().st_mtime_ns for p in streams] == mtimes, "the second run reads the cache"


def test_load_data_directory_glob_and_jsonl(cache: Path, tmp_path: Path):
    books = tmp_path / "books"
    books.mkdir()
    for i in range(12):
        (books / f"book{i:02}.txt").write_text(f"Book {i}.\n" + SONNET * 5)
    (books / "cover.png").write_bytes(b"\x89PNG")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"text": f"Row {i}. " + SONNET * 3, "id": i}) + "\n" for i in range(20))
    )
    for dataset, documents in [
        (str(books), "11"),
        (str(books / "book0*.txt"), "9"),
        (str(rows), "18"),
    ]:
        result = aksis(
            cache, "load-data", "--dataset", dataset, "--batch-size", "2", "--max-length", "8"
        )
        assert result.returncode == 0, (dataset, result.stderr)
        train_row = next(line for line in result.stdout.splitlines() if line.startswith("train "))
        assert train_row.split()[1] == documents, (dataset, train_row)


def test_load_data_tokenizer_path(cache: Path, sonnet: Path, tokenizer_file: Path):
    result = aksis(
        cache,
        "load-data",
        "--dataset",
        str(sonnet),
        "--max-length",
        "8",
        "--tokenizer-path",
        str(tokenizer_file),
    )
    assert result.returncode == 0, result.stderr
    from aksis.tokenizer import load_tokenizer

    assert f"vocabulary of {load_tokenizer(tokenizer_file).get_vocab_size()}" in result.stdout
    assert not (cache / "tokenizers").exists()


@pytest.mark.skipif(not SHARED_WIKITEXT.is_dir(), reason="shared WikiText-2 files not present")
def test_load_data_wikitext_from_a_local_directory(cache: Path):
    result = aksis(
        cache,
        "load-data",
        "--dataset",
        "wikitext2",
        "--data-dir",
        str(SHARED_WIKITEXT),
        "--batch-size",
        "2",
        "--max-length",
        "32",
    )
    assert result.returncode == 0, result.stderr
    assert "validation          60" in result.stdout


def test_load_data_wikitext_offline_fails_fast(cache: Path, tmp_path: Path):
    result = aksis(
        cache,
        "load-data",
        "--dataset",
        "wikitext2",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
    )
    assert_one_line_error(
        result, "Hugging Face Hub", "--dataset shakespeare", "--data-dir", command="load-data"
    )
    assert_no_partial_files(cache)


def test_load_data_bad_input(cache: Path, tmp_path: Path, sonnet: Path):
    "The issue's bad inputs (the notebook tests the other refusals: globs, JSON Lines, --data-dir)"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    (pictures / "cat.png").write_bytes(b"\x89PNG")
    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "ok.txt").write_text("fine\n")
    (latin / "caf.txt").write_bytes("un café\n".encode("latin-1"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')  # `datasets` logs its own error: not shown
    cases = [
        (
            ["--dataset", "tinystories"],
            ["unknown dataset 'tinystories'", "shakespeare, wikitext2 or chitchat"],
        ),
        (["--dataset", ""], ["the dataset is empty: use shakespeare"]),
        (["--dataset", str(tmp_path / "missing.txt")], ["missing.txt not found"]),
        (["--dataset", str(empty)], ["empty.txt is empty"]),
        (["--dataset", str(pictures)], ["has no text files"]),
        (["--dataset", str(latin)], ["caf.txt is not UTF-8", "offset 6"]),
        (["--dataset", str(broken)], ["broken.jsonl, line 2: not valid JSON"]),
        (["--dataset", str(sonnet), "--max-length", "100000"], ["--max-length", "train split"]),
        (["--batch-size", "0"], ["--batch-size", "positive integer"]),
        (["--max-length", "-3"], ["--max-length", "positive integer"]),
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:  # each run mostly waits for `import torch`
        results = list(pool.map(lambda case: aksis(cache, "load-data", *case[0]), cases))
    for (args, fragments), result in zip(cases, results, strict=True):
        assert_one_line_error(result, *fragments, command="load-data")
        assert result.stdout == "", (args, result.stdout)
    assert_no_partial_files(cache)


def test_load_data_in_a_full_cache(cache: Path, tmp_path: Path):
    "A real size limit on the files written (`ulimit -f`, in KiB): one line naming the cache and AKSIS_CACHE"
    corpus = tmp_path / "sonnets.txt"
    corpus.write_text(
        SONNET * 2000
    )  # 166 kB: the Arrow file `datasets` caches does not fit in 64 KiB
    result = subprocess.run(
        [
            "bash",
            "-c",
            'ulimit -f 64 && exec aksis load-data --dataset "$0" --max-length 8',
            corpus,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "AKSIS_CACHE": str(cache)},
    )
    assert_one_line_error(
        result, f"the Aksis cache {cache} has no room left", "set AKSIS_CACHE", command="load-data"
    )
    assert result.stdout == ""
    assert_no_partial_files(cache)


def test_load_data_in_an_unwritable_cache(tmp_path: Path, sonnet: Path):
    "A cache directory that cannot be created (its path runs through a file)"
    (tmp_path / "a-file").write_text("")
    cache = tmp_path / "a-file" / "cache"
    assert_one_line_error(
        aksis(cache, "load-data", "--dataset", str(sonnet), "--max-length", "8"),
        f"cannot write to the Aksis cache {cache}",
        "set AKSIS_CACHE to a writable directory",
        command="load-data",
    )


def test_shakespeare_chat_follows_the_corpus_split():
    "Conversations come from the same plays as `load_corpus('shakespeare')`, split the same way"
    from aksis.data import load_corpus, shakespeare_chat

    corpus = load_corpus("shakespeare")
    for split in ("train", "validation"):
        text = "\n".join(corpus[split]["text"])
        conversations = shakespeare_chat(split)
        assert conversations and conversations == shakespeare_chat(split)  # deterministic
        for c in conversations[::50]:
            for message in c["messages"][2::2]:  # the assistant's words are the persona's speech
                assert f"{c['persona']}:\n{message['content'].splitlines()[0]}" in text, message
    assert not {c["play"] for c in shakespeare_chat("train")} & {
        c["play"] for c in shakespeare_chat("validation")
    }


def test_shakespeare_chat_shape():
    from aksis.data import shakespeare_chat

    for c in shakespeare_chat("validation"):
        assert set(c) == {"messages", "play", "scene", "persona"}
        system, *turns = c["messages"]
        assert system == {
            "role": "system",
            "content": f"You are {c['persona']} in {c['play']}, {c['scene']}. Answer in character.",
        }
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
        assert turns and all(isinstance(m["content"], str) and m["content"] for m in turns)
        assert all(
            ": " in m["content"].split("\n")[0] for m in turns[::2]
        )  # "NAME: ..." user turns


def test_shakespeare_chat_persona():
    from aksis.core import AksisError
    from aksis.data import shakespeare_chat

    portia = shakespeare_chat("validation", persona="portia")
    assert portia and {c["persona"] for c in portia} == {"PORTIA"}
    assert {c["play"] for c in portia} == {"The Merchant of Venice"}
    for persona, fragment in [
        ("Portio", "close matches: PORTIA"),
        ("Zzyzx", "for example"),
        ("Hamlet", "no character 'Hamlet' speaks in the validation plays"),
    ]:
        with pytest.raises(AksisError, match=fragment) as error:
            shakespeare_chat("validation", persona=persona)
        assert "\n" not in str(error.value)
    with pytest.raises(AksisError, match="unknown split 'test'"):
        shakespeare_chat("test")
