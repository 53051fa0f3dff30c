"`precision_for` and the CPU probe behind `auto`: the decision, its cache, and a real CPU without bf16."

import json
import os
import platform
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import aksis.speed as aksis_speed
from aksis.core import AksisError
from aksis.speed import cpu_speed, precision_for

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    "A fresh cache directory for every test"
    monkeypatch.setenv("AKSIS_CACHE", str(tmp_path))
    return tmp_path / "cpu_speed.json"


def probe(fp32, bf16):
    "A stand-in for the timed matrix product, with the given GFLOP/s, that counts its calls"
    calls = []

    def measure(dtype):
        calls.append(dtype)
        return {torch.float32: fp32, torch.bfloat16: bf16}[dtype]

    return measure, calls


@pytest.mark.parametrize("fp32, bf16, dtype", [(62.0, 145.0, torch.bfloat16), (71.0, 1.8, None)])
def test_auto_follows_the_probe(monkeypatch, fp32, bf16, dtype):
    measure, calls = probe(fp32, bf16)
    monkeypatch.setattr(aksis_speed, "_matmul_gflops", measure)
    assert precision_for(CPU, "auto").dtype is dtype
    assert calls == [torch.float32, torch.bfloat16]


def test_a_cache_hit_does_not_measure(monkeypatch, cache):
    measure, calls = probe(71.0, 1.8)
    monkeypatch.setattr(aksis_speed, "_matmul_gflops", measure)
    first = cpu_speed()
    assert first.measured_now and first.cache == cache and len(calls) == 2
    for _ in range(3):
        again = cpu_speed()
        assert not again.measured_now
        assert (again.fp32_gflops, again.bf16_gflops) == (71.0, 1.8)
    assert len(calls) == 2
    assert (
        "fp32 (" in again.describe() and "bf16 matmul 1.8 GFLOP/s vs fp32 71.0" in again.describe()
    )


def test_each_limit_has_its_own_entry(monkeypatch, cache):
    measure, calls = probe(71.0, 1.8)
    monkeypatch.setattr(aksis_speed, "_matmul_gflops", measure)
    cpu_speed()
    with monkeypatch.context() as limited:
        limited.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
        cpu_speed()
        limited.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
        cpu_speed()
    assert len(calls) == 6 and len(json.loads(cache.read_text())) == 3
    assert not cpu_speed().measured_now  # the first entry is still there


@pytest.mark.parametrize(
    "damage",
    [
        "{half a file",
        "[1, 2]",
        '{"KEY": "text"}',
        '{"KEY": {"fp32": 1}}',
        '{"KEY": {"fp32": 1, "bf16": 2, "aten": 3, "onednn": 4}}',  # an older entry: no kernels per rows
    ],
)
def test_a_damaged_cache_is_measured_again(monkeypatch, cache, damage):
    measure, calls = probe(62.0, 145.0)
    monkeypatch.setattr(aksis_speed, "_matmul_gflops", measure)
    cache.write_text(damage.replace("KEY", aksis_speed._cpu_key()))
    assert cpu_speed().measured_now and len(calls) == 2
    assert not cpu_speed().measured_now


def test_an_unwritable_cache_still_decides(monkeypatch, tmp_path):
    monkeypatch.setenv("AKSIS_CACHE", str(tmp_path / "file"))
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setattr(aksis_speed, "_matmul_gflops", probe(62.0, 145.0)[0])
    speed = cpu_speed()
    assert speed.cache is None and speed.bf16_fast and "cached" not in speed.describe()


AMD_EPYC = {"aten": 10.0, "onednn": 20.0, "blockwise": 27.0}, {"aten": 9.0, "onednn": 18.0}
MKL_AHEAD = {"aten": 25.0, "onednn": 20.0, "blockwise": 12.0}, {"aten": 20.0, "onednn": 18.0}
ONEDNN_AHEAD = {"aten": 11.0, "onednn": 22.0, "blockwise": 15.0}, {"aten": 9.0, "onednn": 18.0}


@pytest.mark.parametrize(
    "gbps, kernels",
    [
        (AMD_EPYC, ("blockwise", "onednn")),
        (MKL_AHEAD, ("aten", "aten")),
        (ONEDNN_AHEAD, ("onednn", "onednn")),
    ],
)
def test_the_inference_kernels_follow_the_probe(monkeypatch, cache, gbps, kernels):
    one_row, many_row = gbps
    monkeypatch.setattr(aksis_speed, "_matmul_gflops", probe(71.0, 1.8)[0])
    monkeypatch.setattr(
        aksis_speed,
        "_linear_gbps",
        lambda kernel, rows, dtype=torch.float32: (
            14.0 if dtype == torch.float16 else gbps[rows > 1][kernel]
        ),
    )
    speed = cpu_speed()
    assert (speed.one_row_kernel, speed.many_row_kernel) == kernels
    assert (speed.one_row_gbps, speed.many_row_gbps) == gbps
    one, many = (aksis_speed.Kernel(kernel).label for kernel in kernels)
    assert speed.describe_inference().startswith(f"{one} for one row, {many} for several (")
    (entry,) = json.loads(cache.read_text()).values()
    assert entry == dict(fp32=71.0, bf16=1.8, one_row=one_row, many_row=many_row, fp16_row=14.0)
    assert not speed.fp16_decodes_fast and speed.describe_decoding().startswith("fp32 (")
    assert cpu_speed() == replace(speed, measured_now=False)  # read back as it was measured


def test_kernels_that_fail_leave_aten(monkeypatch):
    def failing(*args):
        raise RuntimeError("no such kernel on this build")

    monkeypatch.setattr(aksis_speed, "_matmul_gflops", probe(71.0, 1.8)[0])
    monkeypatch.setattr(aksis_speed, "onednn_linear", failing)
    monkeypatch.setattr(aksis_speed, "blockwise_linear", failing)
    speed = cpu_speed()
    assert speed.one_row_gbps["onednn"] == speed.one_row_gbps["blockwise"] == 0.0
    assert speed.many_row_gbps["onednn"] == 0.0 and speed.one_row_gbps["aten"] > 0
    assert speed.one_row_kernel == speed.many_row_kernel == "aten"


def test_the_threads_have_their_own_entry(monkeypatch, cache):
    monkeypatch.setattr(aksis_speed, "_matmul_gflops", probe(71.0, 1.8)[0])
    monkeypatch.setattr(aksis_speed, "_linear_gbps", lambda kernel, rows, dtype=torch.float32: 10.0)
    cpu_speed()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert cpu_speed().measured_now
    finally:
        torch.set_num_threads(threads)
    assert not cpu_speed().measured_now and len(json.loads(cache.read_text())) == 2


def test_explicit_names(monkeypatch, capsys):
    monkeypatch.setattr(aksis_speed, "_matmul_gflops", probe(71.0, 1.8)[0])
    assert precision_for(CPU, "bf16").dtype is torch.bfloat16  # asked for: obeyed, with a warning
    assert "bf16 runs 39.4× slower than fp32" in capsys.readouterr().err
    assert precision_for(CPU, "fp32").dtype is None
    with pytest.raises(AksisError, match="unknown precision 'fp8'"):
        precision_for(CPU, "fp8")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(AksisError, match="does not support bf16"):
        precision_for(torch.device("cuda"), "bf16")


PROBE = """
import torch
from aksis.speed import cpu_speed, precision_for
speed = cpu_speed()
print(speed.fp32_gflops, speed.bf16_gflops, precision_for(torch.device("cpu")).dtype)
"""


def real_probe(tmp_path, **env):
    "The real probe's numbers and `auto`'s choice, in a fresh process with `env` added"
    env = {**os.environ, "AKSIS_CACHE": str(tmp_path), **env}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    fp32, bf16, dtype = out.stdout.split()
    return float(fp32), float(bf16), dtype


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="oneDNN's ISA limit is for x86"
)
def test_a_real_cpu_without_bf16(tmp_path):
    fp32, bf16, dtype = real_probe(tmp_path, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    assert dtype == "None" and bf16 < fp32


@pytest.mark.parametrize(
    "fp32, bf16, dtype", [(60.0, 74.0, None), (60.0, 76.0, torch.bfloat16), (60.0, 60.0, None)]
)
def test_auto_takes_bf16_only_past_the_margin(monkeypatch, fp32, bf16, dtype):
    "bf16 must beat fp32 by `BF16_MARGIN`, 1.25: 74 / 60 = 1.23 is not enough, 76 / 60 = 1.27 is"
    monkeypatch.setattr(aksis_speed, "_matmul_gflops", probe(fp32, bf16)[0])
    monkeypatch.setattr(aksis_speed, "_linear_gbps", lambda kernel, rows, dtype=torch.float32: 10.0)
    assert precision_for(CPU, "auto").dtype is dtype


def test_the_real_probe_is_read_back_as_measured(tmp_path):
    "In a fresh process, the real probe's numbers and `auto`'s choice come back the same from the cache"
    first = real_probe(tmp_path)
    assert real_probe(tmp_path) == first and first[2] in ("None", "torch.bfloat16")
