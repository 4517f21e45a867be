"""CMake flags that build llama.cpp (llama-cpp-python) so that it runs on
this machine: GGML_NATIVE off, the x86 features /proc/cpuinfo lists turned
on one by one (AVX2, FMA, F16C, AVX-VNNI, AVX-512 and its VNNI/VBMI/BF16),
and AMX off unless LLAMA_AMX=1.

Why: with GGML_NATIVE=ON llama.cpp compiles its AMX kernels whenever the CPU
advertises AMX, and on Intel Xeon (Sapphire Rapids) VMs they died of SIGILL
at their first `tilezero` (seen with gdb). Linux (5.16+) lets a process use
the tiles only after it asks (arch_prctl ARCH_REQ_XCOMP_PERM); `--probe`
shows both sides here: the same ldtilecfg/tilezero/tilerelease run in a
child process dies of SIGILL without that request and runs after it. So the
tiles are usable, but the pinned llama.cpp's AMX path was seen to use them
without having them granted; AMX stays off for the peer unless LLAMA_AMX=1
asks for it (and the probe says tiles run here).

    python bench/llama_flags.py          prints the CMAKE_ARGS
    python bench/llama_flags.py --probe  tiles with and without the request
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys

ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158  # x86-64

# ldtilecfg [rdi]; tilezero tmm0; tilerelease; ret
AMX_CODE = bytes([0xC4, 0xE2, 0x78, 0x49, 0x07, 0xC4, 0xE2, 0x7B, 0x49, 0xC0, 0xC4, 0xE2, 0x78, 0x49, 0xC0, 0xC3])


def cpu_flags() -> set[str]:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _run_tiles(request: bool) -> None:
    """In the child: ask for the tile state (if `request`), then use one tile."""
    libc = ctypes.CDLL(None, use_errno=True)
    if request and libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0:
        sys.exit(f"arch_prctl(ARCH_REQ_XCOMP_PERM) refused: errno {ctypes.get_errno()}")
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(AMX_CODE)
    # The tile configuration: palette 1, tile 0 of 16 rows x 64 bytes.
    cfg = (ctypes.c_uint8 * 64)()
    cfg[0] = 1
    cfg[16] = 64  # colsb[0], little-endian u16
    cfg[48] = 16  # rows[0]
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    ctypes.CFUNCTYPE(None, ctypes.c_void_p)(address)(ctypes.addressof(cfg))
    print("ok")


def amx_usable(request: bool = True) -> tuple[bool, str]:
    """Whether one AMX tile runs in a child process here, with (or without)
    the tile permission asked for first."""
    if not {"amx_tile", "amx_int8"} <= cpu_flags():
        return False, "the CPU does not advertise amx_tile and amx_int8"
    arg = "--child" if request else "--child-unasked"
    child = subprocess.run([sys.executable, __file__, arg], capture_output=True, text=True, timeout=60)
    if child.returncode == 0 and child.stdout.strip() == "ok":
        return True, "a tile runs"
    why = f"killed by signal {-child.returncode}" if child.returncode < 0 else child.stderr.strip()[-200:]
    return False, f"a tile does not run ({why})"


def cmake_args() -> str:
    flags = cpu_flags()
    on = {
        "GGML_AVX": "avx" in flags,
        "GGML_AVX2": "avx2" in flags,
        "GGML_FMA": "fma" in flags,
        "GGML_F16C": "f16c" in flags,
        "GGML_AVX_VNNI": "avx_vnni" in flags,
        "GGML_AVX512": "avx512f" in flags,
        "GGML_AVX512_VBMI": "avx512vbmi" in flags,
        "GGML_AVX512_VNNI": "avx512_vnni" in flags,
        "GGML_AVX512_BF16": "avx512_bf16" in flags,
    }
    amx = os.environ.get("LLAMA_AMX") == "1" and amx_usable()[0]
    on.update({"GGML_AMX_TILE": amx, "GGML_AMX_INT8": amx, "GGML_AMX_BF16": amx and "amx_bf16" in flags})
    args = ["-DGGML_NATIVE=OFF"] + [f"-D{k}={'ON' if v else 'OFF'}" for k, v in on.items()]
    return " ".join(args)


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        _run_tiles(request=True)
    elif sys.argv[1:] == ["--child-unasked"]:
        _run_tiles(request=False)
    elif sys.argv[1:] == ["--probe"]:
        print(f"AMX after ARCH_REQ_XCOMP_PERM: {amx_usable(True)[1]}")
        print(f"AMX without asking: {amx_usable(False)[1]}")
    else:
        print(cmake_args())
