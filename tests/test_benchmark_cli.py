"End-to-end runs of `aksis benchmark-inference`, as a user would type them: the table, the JSON report, the comparison with transformers, and one-line errors."

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_aksis, tiny_checkpoint

from aksis.core import model_config
from aksis.model import GPT

TINY = ["--preset", "tiny", "--device", "cpu", "--prompt-length", "8", "--max-new-tokens", "16"]


SLOW_BF16 = "warning: bf16 runs"  # --precision bf16 on a CPU without fast bf16 (AVX2 only) says so


def bench_json(*args: str, cwd: Path | None = None) -> tuple[str, dict]:
    "Run `aksis benchmark-inference ... --json -`; the table it printed and the report on its last line"
    result = run_aksis("benchmark-inference", *args, "--json", "-", cwd=cwd)
    assert result.returncode == 0, result.stderr
    allowed = SLOW_BF16 if "bf16" in args else None  # the only line stderr may hold
    assert all(line.startswith(str(allowed)) for line in result.stderr.splitlines()), result.stderr
    *table, last = result.stdout.splitlines()
    return "\n".join(table), json.loads(last)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    "A tiny trained-shape checkpoint with its tokenizer, and a corrupt one beside it"
    directory = tmp_path_factory.mktemp("benchmark")
    (directory / "corrupt.pt").write_bytes(b"not a checkpoint")
    tiny_checkpoint(directory / "epoch_10.pt", ["The quick brown fox jumps over the lazy dog."] * 3)
    return directory / "epoch_10.pt"


def test_table_and_json_report():
    table, report = bench_json(*TINY, "--num-runs", "3", "--warmup", "1")
    for row in [
        "time to first token",
        "time per output token",
        "decode",
        "end to end",
        "peak memory",
    ]:
        assert row in table, table
    assert "bandwidth ceiling" in table and "CPU (" in table, table
    assert report["environment"]["hardware"] == f"CPU ({torch.backends.cpu.get_cpu_capability()})"
    assert report["environment"]["parameters"] == GPT(model_config("tiny")).num_params()
    assert report["workload"] | {"model": None} == {
        "batch_size": 1, "prompt_tokens": 8, "new_tokens": 16, "sampler": "greedy", "lookahead": 0,
        "num_runs": 3, "warmup": 1, "model": None,
    }  # fmt: skip
    tpot, e2e = report["decode"]["time_per_output_token_ms"], report["end_to_end_s"]
    assert 0 < tpot["p50"] <= tpot["p90"] <= tpot["p99"], tpot
    assert 0 < e2e["p50"] <= e2e["p90"] <= e2e["p99"] and e2e["std"] >= 0, e2e
    assert report["prefill"]["tokens_per_s"] > 0 and report["decode"]["tokens_per_s"] > 0
    assert report["prefill"]["time_to_first_token_ms"]["mean"] < e2e["mean"] * 1e3
    assert report["peak_memory"]["bytes"] > 0 and report["peak_memory"]["kind"] == "process RSS"
    bandwidth = report["bandwidth"]
    assert bandwidth["copy_gb_per_s"] > 0.1 and 0 < bandwidth["fraction"] < 1, bandwidth


def test_json_file_and_checkpoint_prompt(checkpoint):
    result = run_aksis(
        "benchmark-inference", "--checkpoint-path", str(checkpoint), "--prompt", "The quick brown fox",
        "--batch-size", "2", "--max-new-tokens", "8", "--num-runs", "2", "--device", "cpu",
        "--json", "report.json", cwd=checkpoint.parent,
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout.rstrip().endswith("report written to report.json"), result.stdout
    report = json.loads((checkpoint.parent / "report.json").read_text())
    assert report["workload"]["batch_size"] == 2 and report["workload"]["model"] == str(checkpoint)
    assert report["workload"]["prompt_tokens"] > 1


@pytest.mark.parametrize("extra", [["--batch-size", "3"], ["--lookahead", "4"]])
def test_compare_transformers_same_tokens(extra):
    table, report = bench_json(
        *TINY, "--num-runs", "2", "--warmup", "1", "--compare", "transformers", *extra
    )
    compare = report["compare"]
    assert compare["same_tokens"] is True and "tokens identical" in table, table
    assert compare["output_tokens_per_s"] > 0 and compare["speedup"] > 0, compare
    assert compare["method"] == (
        "generate, prompt lookup" if "--lookahead" in extra else "generate"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-runs", "0"], "--num-runs: must be a positive integer"),
        (["--max-new-tokens", "121"], "passes the model's 128-token window"),
        (["--sampler", "top-k", "--compare", "transformers"], "needs --sampler greedy"),
    ],
)
def test_bad_workload(argv, message):
    assert_one_line_error(run_aksis("benchmark-inference", *TINY, *argv), message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_one():
    assert_one_line_error(
        run_aksis("benchmark-inference", "--preset", "tiny", "--device", "cuda"), "no CUDA device"
    )


def test_missing_and_corrupt_checkpoint(checkpoint):
    assert_one_line_error(
        run_aksis("benchmark-inference", "--checkpoint-path", "missing.pt"), "not found"
    )
    corrupt = str(checkpoint.parent / "corrupt.pt")
    assert_one_line_error(
        run_aksis("benchmark-inference", "--checkpoint-path", corrupt), "not a readable checkpoint"
    )


def test_compare_without_transformers():
    "As if transformers were not installed: importing it fails"
    hide = "import sys; sys.modules['transformers'] = None; from aksis.cli import main; sys.exit(main())"
    result = subprocess.run(
        [sys.executable, "-c", hide, "benchmark-inference", *TINY, "--compare", "transformers"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert_one_line_error(
        result, "--compare transformers needs Hugging Face transformers: pip install transformers"
    )


@pytest.mark.parametrize("flag, dtype", [(["--precision", "bf16"], "bfloat16"), ([], "float32")])
def test_precision(flag, dtype):
    _, report = bench_json(*TINY, "--num-runs", "1", "--warmup", "0", *flag)
    assert report["environment"]["dtype"] == dtype
