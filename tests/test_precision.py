"""`precision: auto` never picks what is slower on this machine: the rule pinned with fake probes (no timing)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import TINY, sets
from deeprecipe.engine import device
from deeprecipe.engine.device import cpu_bf16_verdict, pick_dtype, probe_cpu_bf16

CPU = torch.device("cpu")


def fake(speedup: float, calls: list | None = None):
    """A probe that reports bf16 at `speedup` times the speed of fp32, counting its calls."""

    def probe() -> dict[str, float]:
        if calls is not None:
            calls.append(1)
        return {"fp32_gflops": 100.0, "bf16_gflops": 100.0 * speedup, "step_speedup": speedup}

    return probe


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPRECIPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_auto_picks_fp32_where_bf16_measures_slower():
    dtype, why = pick_dtype(CPU, "auto", probe=fake(0.25))
    assert dtype is None
    assert why.startswith("precision auto -> fp32:") and "0.25x" in why and "measured" in why


def test_auto_picks_bf16_where_bf16_measures_faster():
    dtype, why = pick_dtype(CPU, "auto", probe=fake(2.0))
    assert dtype is torch.bfloat16 and why.startswith("precision auto -> bf16:")


def test_a_tie_is_not_worth_bf16_rounding():
    assert pick_dtype(CPU, "auto", probe=fake(1.05))[0] is None


def test_the_answer_is_measured_once_per_machine_and_then_read_from_the_cache(tmp_path):
    calls: list = []
    assert pick_dtype(CPU, "auto", probe=fake(0.3, calls))[0] is None
    # a later probe that would say the opposite is never run: the cached answer stands
    dtype, why = pick_dtype(CPU, "auto", probe=fake(3.0, calls))
    assert dtype is None and calls == [1] and "(cached)" in why
    cache = json.loads((tmp_path / "cache" / "precision.json").read_text())
    (key,) = cache
    assert torch.__version__ in key and cache[key]["step_speedup"] == 0.3


def test_another_cpu_or_torch_version_is_measured_again(monkeypatch):
    calls: list = []
    pick_dtype(CPU, "auto", probe=fake(0.3, calls))
    monkeypatch.setattr(device, "cpu_info", lambda: ("Another CPU", {"avx512f"}))
    assert pick_dtype(CPU, "auto", probe=fake(2.0, calls))[0] is torch.bfloat16 and calls == [1, 1]


def test_explicit_bf16_is_honoured_with_a_note_where_it_is_slower(monkeypatch):
    with pytest.warns(UserWarning, match="bf16 kept as asked, though fp32 is faster"):
        dtype, why = pick_dtype(CPU, "bf16", probe=fake(0.25))
    assert dtype is torch.bfloat16 and "auto would pick fp32" in why
    monkeypatch.setattr(device, "cpu_info", lambda: ("A CPU with native bf16", {"avx512_bf16"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # faster: no note
        assert pick_dtype(CPU, "bf16", probe=fake(2.0))[0] is torch.bfloat16


def test_explicit_fp32_never_probes():
    def boom():
        raise AssertionError("probed")

    assert pick_dtype(CPU, "fp32", probe=boom) == (None, "precision fp32: as asked")


def test_under_torchrun_without_a_cached_answer_the_instruction_set_decides(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")

    def boom():
        raise AssertionError("several processes must not time each other")

    monkeypatch.setattr(device, "cpu_info", lambda: ("Old Xeon", {"avx512f", "avx512bw"}))
    assert cpu_bf16_verdict(boom)[0] is False
    monkeypatch.setattr(device, "cpu_info", lambda: ("New Xeon", {"avx512f", "amx_bf16"}))
    assert cpu_bf16_verdict(boom)[0] is True


def test_gpus_without_native_bf16_get_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Old GPU")
    monkeypatch.setattr(device, "cuda_native_bf16", lambda d: False)
    assert pick_dtype(torch.device("cuda"), "auto") == (
        torch.float16,
        "precision auto -> fp16: no native bf16 on Old GPU (fp16 with loss scaling)",
    )
    monkeypatch.setattr(device, "cuda_native_bf16", lambda d: True)
    assert pick_dtype(torch.device("cuda"), "auto")[0] is torch.bfloat16


def test_the_real_probe_measures_both_and_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    with torch.inference_mode():  # as under `predict` or a notebook's no_grad
        got = probe_cpu_bf16(budget=0.02)
    assert torch.equal(before, torch.get_rng_state())
    assert set(got) == {"fp32_gflops", "bf16_gflops", "step_speedup"} and all(v > 0 for v in got.values())


def test_a_run_says_what_auto_chose_in_a_note_and_in_its_config(cli, monkeypatch):
    monkeypatch.setattr(device, "probe_cpu_bf16", fake(0.25))
    tiny = [o for o in TINY if not o.startswith("train.precision")]
    code, out, err = cli("train", "digits-cnn", "--out", "run", *sets(*tiny))
    assert code == 0, err
    assert "note: precision auto -> fp32: a training step 0.25x the speed of fp32" in err
    head = open("run/config.yaml").readline()
    assert head.startswith("# precision auto -> fp32:")
    code, out, err = cli("train", "--resume", "run", "--set", "train.steps=6")  # the comment reads back fine
    assert code == 0, err


ALLOC = """
import resource, torch
from deeprecipe.engine.device import keep_freed_memory
def faults(n=20):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        xs = [torch.ones(k << 18) for k in (1, 6, 3, 12, 2)]  # a step's activations: 1-12 MiB each, written
        del xs
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n
before = faults()
said = keep_freed_memory()
print(said, "|", before, "|", faults())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc malloc's")
def test_the_cpu_allocator_keeps_freed_memory_so_a_step_makes_no_page_faults(subenv):
    """keep_freed_memory (engine/device.py): after it, allocating and freeing a step's worth of tensors again and
    again makes (almost) no minor page faults, the kernel's count (getrusage) being the oracle; a fresh process
    each time, as the setting is per process. With a threshold in the environment it leaves malloc alone."""
    out = subprocess.run([sys.executable, "-c", ALLOC], env=subenv, capture_output=True, text=True, timeout=120)
    said, before, after = out.stdout.strip().split(" | ")
    assert said.startswith("malloc keeps freed memory") and float(after) <= 5, (said, before, after)
    env = {**subenv, "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", ALLOC], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("malloc thresholds left as set (environment)"), out.stdout
