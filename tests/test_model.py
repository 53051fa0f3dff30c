"The model as other code and users meet it: cached decoding in any chunking, and GPT-2 loading offline."

import os
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aksis.core import AksisError, model_config
from aksis.model import GPT, KVCache

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


def run_python(code: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    "Run `code` in a fresh interpreter with `env` added and no proxy; return the result and its duration"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()} | env
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    return result, time.monotonic() - start


LOAD_GPT2 = """
from aksis.core import AksisError
from aksis.model import from_pretrained
try:
    from_pretrained("gpt2")
except AksisError as e:
    print(e)
"""


def test_from_pretrained_offline_fails_fast(tmp_path):
    result, seconds = run_python(LOAD_GPT2, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert (
        "cannot load 'gpt2': it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        in result.stdout
    )
    assert seconds < 60


def test_from_pretrained_with_unreachable_hub_fails_fast(tmp_path):
    "Nothing listens on port 9 here: the reachability check answers at once instead of 30 s of retries"
    result, seconds = run_python(LOAD_GPT2, HF_HOME=str(tmp_path), HF_ENDPOINT="http://127.0.0.1:9")
    assert result.returncode == 0, result.stderr
    assert "http://127.0.0.1:9 is unreachable" in result.stdout
    assert seconds < 60


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
    result, _ = run_python(code)
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.strip()
        == "GPT-2 interchange needs Hugging Face transformers: pip install transformers"
    )
