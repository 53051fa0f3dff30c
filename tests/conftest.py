"What the end-to-end tests share: running the installed `aksis`, its one-line errors, a tiny checkpoint, a tiny GPT-2 directory, and the environment of a module's runs."

import os
import subprocess
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from aksis.core import model_config
from aksis.model import GPT, save_checkpoint
from aksis.tokenizer import EOT, train_tokenizer


def run_aksis(
    *args: str,
    env: dict[str, str] | None = None,  # The environment of the run; None: this process's
    cwd: Path | None = None,  # Where it runs; None: here
    stdin: str = "",  # What the user types
    timeout: float = 300,  # Seconds before the run counts as hung
) -> subprocess.CompletedProcess:
    "Run the installed `aksis` script with `args`, typing `stdin`, capturing its output"
    return subprocess.run(
        ["aksis", *args], input=stdin, capture_output=True, text=True, env=env, cwd=cwd,
        timeout=timeout,
    )  # fmt: skip


def assert_one_line_error(
    result: subprocess.CompletedProcess,
    *fragments: str,  # Each must be in the line
    command: str | None = None,  # If given, the line starts `aksis {command}: error: `
) -> None:
    "The run failed as a user's mistake should: status 2, one line on stderr naming the problem, no traceback"
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    if command is not None:
        assert lines[0].startswith(f"aksis {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def tiny_checkpoint(
    path: Path,
    texts: list[str],  # What the tokenizer is trained on
    vocab_size: int = 300,  # The tokenizer's
    train_state: dict | None = None,  # Saved with it, as by `save_checkpoint`
    **config,  # Changes to the tiny preset, e.g. `max_seq_len`
) -> tuple[GPT, Tokenizer]:
    "Save an untrained tiny model (seed 0) and a tokenizer trained on `texts` to `path`; return both"
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    torch.manual_seed(0)
    model = GPT(model_config("tiny", vocab_size=tokenizer.get_vocab_size(), **config))
    save_checkpoint(path, model, tokenizer, train_state)
    return model, tokenizer


def write_tiny_gpt2(
    directory: Path,
    text: str,  # What the tokenizer is trained on
    tokenizer_size: int = 300,  # The tokenizer's vocabulary
    model_vocab: int | None = None,  # The model's; None: the tokenizer's
    n_layer: int = 2,  # Decoder blocks
    n_positions: int = 128,  # The context window
    tokenizer_files: str = "tokenizer.json",  # or "vocab.json": vocab.json and merges.txt
):
    "A random GPT-2 (seed 0) and a GPT-2-style byte-level BPE (only `<|endoftext|>` special), as transformers saves them; return both"
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=tokenizer_size, special_tokens=[EOT], initial_alphabet=alphabet,
        show_progress=False,
    )  # fmt: skip
    bpe.train_from_iterator([text] * 20, trainer)
    config = transformers.GPT2Config(
        vocab_size=model_vocab or bpe.get_vocab_size(), n_positions=n_positions, n_embd=32,
        n_layer=n_layer, n_head=2, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    if tokenizer_files == "tokenizer.json":
        transformers.PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(directory)
    else:
        bpe.model.save(str(directory))
    return model, bpe


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    "The environment of a module's runs: one cache, so each tokenizer is trained once; one thread; no Hub"
    return {
        **os.environ,
        "AKSIS_CACHE": str(tmp_path_factory.mktemp("cache")),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
