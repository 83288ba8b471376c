"""The int8-weight GEMV kernels of `gemv.c`, for the few-row products of batch-1 decode.

`library()` compiles gemv.c once per machine with the system C compiler (`$CC`, else `cc`/`gcc`;
`-O3 -march=native -ffp-contract=off -fopenmp`, about 0.3 s), caches the shared object under
`$XDG_CACHE_HOME/llmcycle/kernels` keyed by the source, compiler and CPU flags, and loads it with ctypes.
Without a compiler, on a compile error, or with `LLMCYCLE_NATIVE_GEMV=0`, it returns None after one log
line and the quantized layers keep torch's kernels: slower at one row, same model.

The shared object links libgomp by its soname, which torch has already loaded, so its OpenMP threads are
torch's own pool (no second runtime spinning against the first).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv.c")
# Up to these many activation rows the GEMV beats torch's kernels at both 1 and 2 threads on the machine
# measured (AVX512-VNNI; `benchmarks/quantize.py` and docs/benchmarks.md): the weight-only product widens
# every weight per row, so extra rows cost compute soon; the int8 x int8 one stays memory-bound longer.
W8A16_MAX_ROWS = 2
W8A8_MAX_ROWS = 8
ISA_NAMES = {0: "plain C", 1: "AVX2", 2: "AVX512-VNNI"}

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llmcycle" / "kernels"


def build(cc: str, out: Path, arch: tuple[str, ...] = ("-march=native",)) -> None:
    """Compiles gemv.c for `arch` into `out`, atomically (a temporary file renamed), so processes that compile
    at the same time never load a half-written file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, "-O3", *arch, "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", tmp]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: Path) -> ctypes.CDLL:
    """A compiled gemv.c with its functions' argument types declared."""
    lib = ctypes.CDLL(str(path))
    lib.llmc_isa.restype = ctypes.c_int
    lib.llmc_w8a16.argtypes = [_P, _P, _P, _P, _I64, _I64, _I64, ctypes.c_int, _P, _P]
    lib.llmc_w8a8.argtypes = [_P, _P, _P, _P, _P, _P, _I64, _I64, _I64, ctypes.c_int, _P, _P]
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be had here (the reason logged once)."""
    if os.environ.get("LLMCYCLE_NATIVE_GEMV", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        log.info("no C compiler found: quantized layers use torch's kernels at batch 1 (slower).")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + _cpu_flags().encode()).hexdigest()[:16]
        path = _cache_dir() / f"gemv-{key}.so"
        if not path.exists():
            try:
                build(cc, path)
            except PermissionError:  # a read-only home: compile for this process only
                path = Path(tempfile.mkdtemp(prefix="llmcycle-kernels-")) / path.name
                build(cc, path)
        lib = load(path)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("could not build the int8 GEMV kernel (%s); quantized layers use torch's kernels at "
                    "batch 1 (slower).", detail.strip().splitlines()[-1] if detail.strip() else e)
        return None
    log.debug("int8 GEMV kernel: %s (%s)", path, ISA_NAMES.get(lib.llmc_isa(), "?"))
    return lib


def usable(x: torch.Tensor, q: torch.Tensor, max_rows: int) -> bool:
    """Whether the GEMV takes this product: CPU tensors, at most `max_rows` rows, contiguous int8 [N, K]."""
    return (x.device.type == "cpu" and x.shape[0] <= max_rows and q.dtype == torch.int8
            and q.is_contiguous() and library() is not None)


def _operands(x: torch.Tensor, q: torch.Tensor, lib: ctypes.CDLL | None) -> tuple[ctypes.CDLL, torch.Tensor, torch.Tensor]:
    """The library, x as contiguous fp32, and the fp32 output [rows, out_features] to fill."""
    return lib or library(), x.float().contiguous(), torch.empty(x.shape[0], q.shape[0], dtype=torch.float32)


def w8a16(x: torch.Tensor, q: torch.Tensor, wscale: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] @ (q [N, K] * wscale[N, None])^T, fp32 out; activations kept to 15 bits per block
    of 128 (gemv.c)."""
    lib, x, y = _operands(x, q, lib)
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.int16)
    xs = torch.empty(m, (k + 127) // 128, dtype=torch.float32)
    lib.llmc_w8a16(x.data_ptr(), q.data_ptr(), wscale.data_ptr(), y.data_ptr(), m, q.shape[0], k,
                   torch.get_num_threads(), xq.data_ptr(), xs.data_ptr())
    return y


def w8a8(x: torch.Tensor, q: torch.Tensor, wscale: torch.Tensor, wsum: torch.Tensor,
         xscale: torch.Tensor | None, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """int8 activations (one scale per row: `xscale`, or max |x| / 127 when None) times int8 weights, as
    the W8A8 layers compute with `torch._int_mm`: the same codes and int32 sums. `wsum` = q.sum(1), int32."""
    lib, x, y = _operands(x, q, lib)
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.int8)
    xs = torch.empty(m, dtype=torch.float32)
    lib.llmc_w8a8(x.data_ptr(), None if xscale is None else xscale.data_ptr(), q.data_ptr(), wscale.data_ptr(),
                  wsum.data_ptr(), y.data_ptr(), m, q.shape[0], k, torch.get_num_threads(), xq.data_ptr(),
                  xs.data_ptr())
    return y
