"""Device, precision and process-group setup, applied from outside the (plain) model."""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from deeprecipe.core import UserError, cache_dir
from deeprecipe.runtime import Runtime  # re-exported: engine.device.Runtime


def pick_device(name: str = "auto") -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine (use --device cpu)")
    return dev


# ------------------------------------------------------------------------------------------ precision
# `precision: auto` must never be slower than plain fp32. On a CPU, oneDNN reports bf16 as "supported" where it
# only emulates it (Intel Skylake to Ice Lake, AMD Zen 2/3: about 4x slower than fp32), so the CPU's answer is
# measured once per machine (CPU model and torch version) and cached in cache_dir()/precision.json.

PROBE_KEY_VERSION = 2  # a new probe measures again
BF16_MARGIN = 1.10  # bf16 must be at least this much faster than fp32 to be chosen: a tie is not worth the rounding


def cpu_info() -> tuple[str, set[str]]:
    """(CPU model name, instruction-set flags) from /proc/cpuinfo; elsewhere the platform's processor name."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "CPU part") and not name:
                name = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def native_bf16(flags: set[str]) -> bool:
    """Whether the CPU has bf16 arithmetic in hardware (x86 AVX512-BF16 or AMX, Arm BF16)."""
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def probe_cpu_bf16(budget: float = 1.0) -> dict[str, float]:
    """Time fp32 against bf16 on this CPU, alternating so that a neighbour's load hits both alike: a 512^3 matmul
    (GFLOP/s) and a training step (forward + backward, channels_last, as the engine runs conv nets) of a small CNN
    on a batch of 64 28x28 images under autocast. The step decides: a net too small for its step to outweigh
    autocast's casts would measure the overhead, not the arithmetic (bf16 1.1-1.2x on a CPU where a real CNN step
    runs 1.7x). About `budget` seconds in all, at least two steps of each."""
    # the layers' init must not move the run's global RNG; the step needs autograd even when called under no_grad
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        return _probe(budget)


def _probe(budget: float) -> dict[str, float]:
    nn = torch.nn
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=gen), torch.randn(512, 512, generator=gen)
    a16, b16 = a.bfloat16(), b.bfloat16()
    net = nn.Sequential(  # the classic conv32-pool-conv64-pool-conv128 CNN, with BatchNorm
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.BatchNorm2d(128),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    ).to(memory_format=torch.channels_last)
    x = torch.randn(64, 1, 28, 28, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,), generator=gen)

    def matmul(bf16: bool) -> None:
        (a16 @ b16) if bf16 else (a @ b)

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()

    best = {}
    for name, fn in (("matmul", matmul), ("step", step)):
        fn(False), fn(True)  # warm up: oneDNN builds its kernels on first use
        times = {False: float("inf"), True: float("inf")}
        end = time.perf_counter() + budget / 2
        rep = 0
        while rep < 2 or time.perf_counter() < end:
            rep += 1
            for bf16 in (False, True):
                t = time.perf_counter()
                fn(bf16)
                times[bf16] = min(times[bf16], time.perf_counter() - t)
        best[name] = times
    flop = 2 * 512**3
    return {
        "fp32_gflops": flop / best["matmul"][False] / 1e9,
        "bf16_gflops": flop / best["matmul"][True] / 1e9,
        "step_speedup": best["step"][False] / best["step"][True],  # > 1: bf16 is faster
    }


def cpu_bf16_verdict(probe=None) -> tuple[bool, str]:
    """(whether bf16 is faster than fp32 on this CPU, why), measured by `probe` once per CPU model and torch
    version and then read from cache_dir()/precision.json. Where measuring is unsafe (several processes of one
    torchrun job would time each other) and nothing is cached, the CPU's native-bf16 flags decide."""
    name, flags = cpu_info()
    isa = "native bf16" if native_bf16(flags) else "no native bf16"
    key = f"v{PROBE_KEY_VERSION} | {name} | {isa} | torch {torch.__version__}"
    path = cache_dir() / "precision.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    got, how = cache.get(key), "cached"
    if not isinstance(got, dict) or not {"fp32_gflops", "bf16_gflops", "step_speedup"} <= set(got):
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            fast = native_bf16(flags)
            return (
                fast,
                f"{'native' if fast else 'no native'} bf16 instructions on {name} (not measured under torchrun)",
            )
        got, how = (probe or probe_cpu_bf16)(), "measured"
        cache[key] = got
        try:  # a cache that cannot be written only costs a probe next time
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(path)
        except OSError:
            pass
    fast = got["step_speedup"] >= BF16_MARGIN
    why = (
        f"a training step {got['step_speedup']:.2f}x the speed of fp32 in bf16, matmul bf16 {got['bf16_gflops']:.0f}"
        f" vs fp32 {got['fp32_gflops']:.0f} GFLOP/s on {name} ({how})"
    )
    return fast, why


def cuda_native_bf16(device: torch.device) -> bool:
    """bf16 in hardware (Ampere and newer); torch's is_bf16_supported() also says yes where it is emulated."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 has no such argument
        return torch.cuda.get_device_capability(device)[0] >= 8


def pick_dtype(device: torch.device, precision: str = "auto", probe=None) -> tuple[torch.dtype | None, str]:
    """The autocast dtype of a run (None: fp32) and one line saying why (the run's note and config.yaml).
    `auto` picks the fastest of what is safe: bf16 where this machine runs it faster than fp32, fp16 (with loss
    scaling) on GPUs without native bf16, fp32 otherwise."""
    names = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise UserError(f"train.precision={precision}: use auto, bf16, fp16 or fp32")
    if precision != "auto":
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        why = f"precision {precision}: as asked"
        if precision == "bf16" and device.type == "cpu":
            fast, measured = cpu_bf16_verdict(probe)
            if not fast:
                why += f" (auto would pick fp32 here: {measured})"
                warnings.warn(
                    f"precision bf16 kept as asked, though fp32 is faster on this CPU: {measured}", stacklevel=2
                )
        return dtype, why
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if cuda_native_bf16(device):
            return torch.bfloat16, f"precision auto -> bf16: native bf16 on {name}"
        return torch.float16, f"precision auto -> fp16: no native bf16 on {name} (fp16 with loss scaling)"
    if device.type == "cpu":
        fast, why = cpu_bf16_verdict(probe)
        dtype = torch.bfloat16 if fast else None
        return dtype, f"precision auto -> {names[dtype]}: {why}"
    return None, f"precision auto -> fp32: autocast on {device.type} is not measured, fp32 is the safe choice"


# ------------------------------------------------------------------------------------------ the CPU's allocator
# glibc's malloc serves a block above its mmap threshold (128 KiB at first, raised as big blocks are freed) with a
# fresh mmap and gives it back on free, and trims the heap top above 128 KiB: a CPU step that allocates and frees
# its activations then makes the kernel map and zero them again each step. Measured on the char GPT step (2-core
# EPYC): 9,000-12,000 minor page faults a step (about 40 MB zeroed), and 1-6 with the two thresholds below, the
# step 1.05-1.39x as fast (the Fashion-MNIST CNN's: 2,300-4,200 faults, 1.17-1.33x). Freed memory stays in the
# process for the next step instead: the resident size is the peak in use, as it is during a step anyway.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit: blocks above it still come from mmap
TRIM_THRESHOLD = 1 << 30
_allocator: str | None = None


def keep_freed_memory() -> str:
    """Set glibc malloc's mmap and trim thresholds once per process (see above); what was done, in words. Nothing
    off Linux's glibc, or where the user set them (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or
    GLIBC_TUNABLES in the environment), or where DEEPRECIPE_MALLOC=0."""
    global _allocator
    if _allocator is None:
        _allocator = _set_thresholds()
    return _allocator


def _set_thresholds() -> str:
    import ctypes

    env = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
    if os.environ.get("DEEPRECIPE_MALLOC") == "0" or any(k in os.environ for k in env):
        return "malloc thresholds left as set (environment)"
    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return "malloc thresholds: not glibc, left alone"
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "malloc thresholds: no libc.so.6, left alone"
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        return f"malloc keeps freed memory below {MMAP_THRESHOLD >> 20} MiB (no page faults a step)"
    return "malloc thresholds: mallopt refused, left alone"


def setup(device: str = "auto", precision: str = "auto") -> Runtime:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPU), pick device and dtype; on the
    CPU, keep freed memory in the process (keep_freed_memory)."""
    dev = pick_device(device)
    if dev.type == "cpu":
        keep_freed_memory()
    rank, world = 0, 1
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    dtype, why = pick_dtype(dev, precision)
    return Runtime(dev, dtype, rank, world, why)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    for key, s in state.items():
        if key.startswith("cuda") and torch.cuda.is_available() and int(key[4:]) < torch.cuda.device_count():
            torch.cuda.set_rng_state(s, int(key[4:]))


def step_generator(device: torch.device, *keys: int) -> torch.Generator:
    """A generator seeded by (seed, step, ...): augmentation of step s is the same in a resumed run."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)
