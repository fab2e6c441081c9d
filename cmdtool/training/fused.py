"""The CPU update of online CMD as one C loop: each parameter's state is read and written once
(and the reset of embedded parameters after an optimizer step, ``cmd_hold``).

``DeviceState.observe`` in torch takes about 13 passes over the ``N`` float64 values (the gathers of
the per-mode factors, the per-mode ``index_add_``, the elementwise steps); this loop does the same
arithmetic per parameter in registers, so the update costs about the memory traffic of its state
(48 bytes per parameter). It is compiled from the source below with the system's C compiler (``cc``,
or ``$CC``) on first use, into ``$CMDTOOL_CACHE`` (default ``~/.cache/cmdtool``), and loaded with
ctypes. Without a compiler, or with ``CMDTOOL_NO_COMPILE=1``, the torch update runs instead (the
same least squares; a test holds the two equal to 1e-12).

Only our own source string is compiled, never anything read from a file; the library is written to a
private temporary folder and moved into place atomically, so concurrent first uses do not collide.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = r"""
#include <stdint.h>

/* One observation over the n columns of one tensor (see DeviceState.observe for the algebra):
   y = w - b, e = y - a*rho (0 where frozen, and then y = a*rho), squares[lane] += e*e,
   a = (a + grow*rho*y) * inverse_ratio, b += mean_step*y, and the three sums of squares. */
void cmd_observe(const float *w, int64_t n, double *a, double *b, const double *first,
                 const int32_t *where, const uint8_t *frozen, const double *rho,
                 const double *inverse_ratio, double grow, double mean_step,
                 double *squares, double *sums)
{
    double s_norm = 0.0, s_disp = 0.0, s_cent = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const double x = (double)w[i];
        const int32_t m = where[i];
        const double r = rho[m];
        const double d = x - first[i];
        double y = x - b[i];
        double e = y - r * a[i];
        s_norm += x * x;
        s_disp += d * d;
        s_cent += y * y;
        if (frozen && frozen[i]) {
            y -= e;
            e = 0.0;
        }
        squares[m] += e * e;
        a[i] = (a[i] + grow * y * r) * inverse_ratio[m];
        b[i] += mean_step * y;
    }
    sums[0] += s_norm;
    sums[1] += s_disp;
    sums[2] += s_cent;
}

/* Embedded CMD after an optimizer step: target[positions[i]] = a[i] * live[labels[i]] + b[i],
   rounded to float32, for the n embedded entries of one float32 tensor. */
void cmd_hold(float *target, const int64_t *positions, int64_t n, const double *a, const double *b,
              const int32_t *labels, const double *live)
{
    for (int64_t i = 0; i < n; i++)
        target[positions[i]] = (float)(a[i] * live[labels[i]] + b[i]);
}
"""
FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]  # no FMA: torch's rounding

_loaded: dict[tuple, object] = {}


def cache_folder() -> Path:
    if os.environ.get("CMDTOOL_CACHE"):
        return Path(os.environ["CMDTOOL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cmdtool"


def library():
    """The compiled functions (``.cmd_observe``, ``.cmd_hold``; a ctypes library), or None where they
    cannot be built (looked up once per setting of ``CMDTOOL_NO_COMPILE``, ``CC`` and the cache folder)."""
    setting = (os.environ.get("CMDTOOL_NO_COMPILE", ""), os.environ.get("CC", ""), str(cache_folder()))
    if setting not in _loaded:
        _loaded[setting] = None if setting[0] else _find()
    return _loaded[setting]


def _find():
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        return None
    key = hashlib.sha256("\0".join([SOURCE, compiler, *FLAGS, platform.machine(), platform.system()]).encode())
    return _build_and_load(compiler, f"cmdtool-{key.hexdigest()[:16]}.so")


def _build_and_load(compiler: str, name: str):
    folder = cache_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        if not path.is_file():
            _compile(compiler, path)
    except (OSError, subprocess.SubprocessError):
        try:  # a read-only cache: a private folder of this process
            path = Path(tempfile.mkdtemp(prefix="cmdtool-")) / name
            _compile(compiler, path)
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        loaded = ctypes.CDLL(str(path))
        observe, hold = loaded.cmd_observe, loaded.cmd_hold
    except (OSError, AttributeError):
        return None
    pointer, integer, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    observe.restype = hold.restype = None
    observe.argtypes = [pointer, integer, pointer, pointer, pointer, pointer, pointer, pointer, pointer,
                        real, real, pointer, pointer]
    hold.argtypes = [pointer, pointer, integer, pointer, pointer, pointer, pointer]
    return loaded


def _compile(compiler: str, library: Path) -> None:
    """Compile ``SOURCE`` into ``library``: built in a private folder, then moved into place atomically."""
    with tempfile.TemporaryDirectory(prefix="cmdtool-build-") as work:
        source, built = Path(work) / "cmdtool_fused.c", Path(work) / library.name
        source.write_text(SOURCE)
        subprocess.run([compiler, *FLAGS, "-o", str(built), str(source)], check=True, capture_output=True,
                       timeout=120)
        staged = library.with_name(f".{library.name}.{os.getpid()}.tmp")
        shutil.copyfile(built, staged)
        os.replace(staged, library)
