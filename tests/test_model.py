"The model as other code and users meet it: cached decoding in any chunking, checkpoints, and GPT-2 as a starting point (offline)."

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_checkpoint, write_tiny_gpt2
from hypothesis import given, settings
from hypothesis import strategies as st

from aksis.core import AksisError, model_config
from aksis.model import GPT, KVCache, grow_vocab, load_checkpoint, load_gpt2, save_checkpoint
from aksis.tokenizer import ASSISTANT, END_TURN, EOT, SPECIAL_TOKENS, USER, tokenizer_from_json

CONFIG = model_config(
    "tiny", vocab_size=50, max_seq_len=32, n_layer=2, n_head=2, d_model=32, d_ff=64
)
torch.manual_seed(0)
MODEL = GPT(CONFIG).eval()


@settings(max_examples=25, deadline=None)
@given(
    batch_size=st.integers(1, 3),
    chunks=st.lists(st.integers(1, 6), min_size=1, max_size=5),  # at most 30 of 32 positions,
    seed=st.integers(0, 2**16),
)
def test_cached_forward_in_any_chunks_equals_full_forward(batch_size, chunks, seed):
    "Feeding a sequence through the cache in chunks of any sizes gives the full forward's logits"
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, CONFIG.vocab_size, (batch_size, sum(chunks)), generator=generator)
    cache = KVCache(CONFIG, batch_size, "cpu")
    with torch.no_grad():
        full = MODEL(idx)[0]
        pieces, start = [], 0
        for size in chunks:
            pieces.append(MODEL(idx[:, start : start + size], kv_cache=cache)[0])
            start += size
    assert cache.pos == idx.size(1)
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-5


def test_too_long_is_an_aksis_error():
    with pytest.raises(AksisError, match="longer than the model's max_seq_len 32"):
        MODEL(torch.zeros(1, 33, dtype=torch.long))


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    "Run `code` in a fresh interpreter with `env` added and no proxy"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()} | env
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


LOAD_GPT2 = """
from aksis.core import AksisError
from aksis.model import from_pretrained
try:
    from_pretrained("gpt2")
except AksisError as e:
    print(e)
"""


def test_from_pretrained_offline_fails_fast(tmp_path):
    result = run_python(LOAD_GPT2, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert (
        "cannot load 'gpt2': it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        in result.stdout
    )


def test_from_pretrained_with_unreachable_hub_fails_fast(tmp_path):
    "Nothing listens on port 9 here: the reachability check answers at once instead of 30 s of retries"
    result = run_python(LOAD_GPT2, HF_HOME=str(tmp_path), HF_ENDPOINT="http://127.0.0.1:9")
    assert result.returncode == 0, result.stderr
    assert "http://127.0.0.1:9 is unreachable" in result.stdout


def test_interchange_without_transformers_names_the_fix():
    code = """
import sys
sys.modules["transformers"] = None  # as if it were not installed
from aksis.core import AksisError, model_config
from aksis.model import GPT, to_hf
try:
    to_hf(GPT(model_config("tiny", vocab_size=10)))
except AksisError as e:
    print(e)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.strip()
        == "GPT-2 interchange needs Hugging Face transformers: pip install transformers"
    )


def to_be(path):
    "Save a tiny model and the tokenizer it reads to `path`, as saved at step 1; return the model"
    return tiny_checkpoint(path, ["to be or not to be"] * 10, train_state={"step": 1})[0]


def test_checkpoint_round_trip(tmp_path):
    model = to_be(tmp_path / "model.pt")
    checkpoint = load_checkpoint(tmp_path / "model.pt")
    assert checkpoint.config == model.config and checkpoint.train_state == {"step": 1}
    assert all(
        torch.equal(checkpoint.model.state_dict()[k], v) for k, v in model.state_dict().items()
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_at_load(tmp_path, value):
    "A diverged run (say `--learning-rate inf`) saves NaN weights; loading them is a one-line error"
    to_be(tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    state["model"]["ln_f.weight"][0] = value
    torch.save(state, tmp_path / "diverged.pt")
    with pytest.raises(AksisError, match="non-finite weights") as error:
        load_checkpoint(tmp_path / "diverged.pt")
    assert "\n" not in str(error.value)


@pytest.mark.skipif(sys.platform == "win32", reason="ulimit -f is POSIX")
def test_save_past_a_file_size_limit_keeps_the_old_checkpoint(tmp_path):
    "A real write failure (EFBIG under `ulimit -f`, which torch.save reports as a RuntimeError) is one line"
    to_be(tmp_path / "model.pt")
    old = (tmp_path / "model.pt").read_bytes()
    code = f"""
from aksis.core import AksisError
from aksis.model import load_checkpoint, save_checkpoint
ckpt = load_checkpoint({str(tmp_path / "model.pt")!r})
try:
    save_checkpoint({str(tmp_path / "model.pt")!r}, ckpt.model, ckpt.tokenizer, {{"step": 2}})
except AksisError as e:
    print(e)
"""
    limit_kib = len(old) // 1024 // 2
    result = subprocess.run(
        ["bash", "-c", f'ulimit -f {limit_kib} && exec "$@"', "bash", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"could not write {tmp_path / 'model.pt'}: File too large\n"
    assert (tmp_path / "model.pt").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_checkpoint_info_round_trip_and_older_files(tmp_path):
    "`info` comes back as saved; a file written before checkpoints had `info` loads with {}"
    model = to_be(tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    info = {"fine_tuned": {"task": "chat", "init_from": "gpt2", "dataset": "shakespeare-chat"}}
    save_checkpoint(
        tmp_path / "tuned.pt", model, tokenizer_from_json(state["tokenizer"]), None, info
    )
    assert load_checkpoint(tmp_path / "tuned.pt").info == info
    del state["info"]
    torch.save(state, tmp_path / "older.pt")
    assert load_checkpoint(tmp_path / "older.pt").info == {}
    with pytest.raises(AksisError, match="plain data"):
        save_checkpoint(
            tmp_path / "odd.pt",
            model,
            tokenizer_from_json(state["tokenizer"]),
            info={"x": object()},
        )
    assert not (tmp_path / "odd.pt").exists()


WINTER = "Now is the winter of our discontent"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    "A random 2-layer GPT-2 and a GPT-2-style byte-level BPE, as transformers saves them"
    directory = tmp_path_factory.mktemp("gpt2")
    write_tiny_gpt2(directory, WINTER)
    return directory


def test_load_gpt2_from_a_directory_matches_transformers(gpt2_dir, capfd):
    import transformers

    model, tokenizer = load_gpt2(str(gpt2_dir))
    assert capfd.readouterr() == ("", "")  # no "Loading weights" progress bar or warnings
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    old = hf.config.vocab_size
    ids = torch.tensor([tokenizer.encode("Now is the winter of our discontent, made glorious").ids])
    assert ids.max() < old
    with torch.no_grad():
        ours = model.eval()(ids)[0]
        assert (ours[..., :old] - hf(ids).logits).abs().max() <= 1e-4
    new_ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    assert new_ids == [0, *range(old, old + len(SPECIAL_TOKENS) - 1)]  # EOT keeps its id
    assert model.config.vocab_size == tokenizer.get_vocab_size() == old + len(SPECIAL_TOKENS) - 1
    assert all(
        i < old for i in tokenizer.encode(f"{USER}{END_TURN}{EOT}").ids
    )  # typed, not special


def test_grow_vocab_keeps_old_rows_and_ties_the_output_layer():
    torch.manual_seed(0)
    model = GPT(CONFIG)
    old = model.wte.weight.detach().clone()
    grow_vocab(model, CONFIG.vocab_size + 3)
    assert torch.equal(model.wte.weight[: CONFIG.vocab_size].detach(), old)
    assert torch.allclose(model.wte.weight[CONFIG.vocab_size :].detach(), old.mean(0).expand(3, -1))
    assert model.lm_head.weight is model.wte.weight
    assert model(torch.tensor([[CONFIG.vocab_size + 2]]))[0].shape == (1, 1, CONFIG.vocab_size + 3)


def test_load_gpt2_from_vocab_and_merges(gpt2_dir, tmp_path):
    old_style = tmp_path / "old"
    write_tiny_gpt2(old_style, WINTER, tokenizer_files="vocab.json")
    text = "Made glorious summer by this sun of York"
    assert (
        load_gpt2(str(old_style))[1].encode(text).ids
        == load_gpt2(str(gpt2_dir))[1].encode(text).ids
    )


def test_load_gpt2_checkpoint_round_trip_and_generation(gpt2_dir, tmp_path):
    "A GPT-2 start is an ordinary Aksis model: saved, loaded, and decoded with the KV cache"
    model, tokenizer = load_gpt2(str(gpt2_dir))
    save_checkpoint(tmp_path / "gpt2.pt", model, tokenizer, info={"init_from": str(gpt2_dir)})
    checkpoint = load_checkpoint(tmp_path / "gpt2.pt")
    assert checkpoint.tokenizer.to_str() == tokenizer.to_str()
    assert checkpoint.info == {"init_from": str(gpt2_dir)}
    prompt = [tokenizer.token_to_id(USER), *tokenizer.encode("Now is").ids]
    prompt += [tokenizer.token_to_id(END_TURN), tokenizer.token_to_id(ASSISTANT)]
    idx = torch.tensor([prompt])
    cache = KVCache(checkpoint.config, 1, "cpu")
    with torch.no_grad():
        assert torch.equal(checkpoint.model(idx)[0], model.eval()(idx)[0])
        logits = checkpoint.model(idx, kv_cache=cache)[0]
        for _ in range(4):
            idx = torch.cat([idx, logits[:, -1:].argmax(-1)], dim=1)
            logits = checkpoint.model(idx[:, -1:], kv_cache=cache)[0]
            assert (logits - checkpoint.model(idx)[0][:, -1:]).abs().max() <= 1e-5
    assert isinstance(checkpoint.tokenizer.decode(idx[0].tolist()), str)


@pytest.mark.parametrize(
    "layout, message",
    [
        ("empty", "is not a GPT-2 model directory (no readable config.json)"),
        ("bert", "is not a GPT-2 model directory (a bert model)"),
        ("no-weights", "cannot load the GPT-2 in"),
        ("no-tokenizer", "has no tokenizer: expected tokenizer.json, or vocab.json and merges.txt"),
    ],
)
def test_load_gpt2_refuses_a_directory_without_a_gpt2(gpt2_dir, tmp_path, layout, message):
    directory = tmp_path / layout
    if layout == "no-tokenizer":
        shutil.copytree(gpt2_dir, directory, ignore=shutil.ignore_patterns("tokenizer.json"))
    else:
        directory.mkdir()
    if layout == "bert":
        (directory / "config.json").write_text('{"model_type": "bert"}')
    if layout == "no-weights":
        shutil.copy(gpt2_dir / "config.json", directory)
    with pytest.raises(AksisError) as error:
        load_gpt2(str(directory))
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_load_gpt2_offline_fails_fast(tmp_path):
    code = LOAD_GPT2.replace("from_pretrained", "load_gpt2")
    result = run_python(code, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "cannot load 'gpt2': it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; connect to the internet and retry"
    )
