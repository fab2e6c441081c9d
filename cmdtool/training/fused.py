"""The CPU update of online CMD as one C loop: each parameter's state is read and written once
(and embedded CMD's two passes: the change of each fit at a window, ``cmd_change``, and the reset
of embedded parameters after an optimizer step, ``cmd_hold``).

``DeviceState.observe`` in torch takes about 13 passes over the ``N`` float64 values (the gathers of
the per-mode factors, the per-mode ``index_add_``, the elementwise steps); this loop does the same
arithmetic per parameter in registers, so the update costs about the memory traffic of its state
(48 bytes per parameter). It is compiled from the source below with the system's C compiler (``cc``,
or ``$CC``) on first use, into ``lib/`` of cmdtool's cache (``$CMDTOOL_CACHE``, default
``~/.cache/cmdtool``), and loaded with ctypes. Without a compiler, or with ``CMDTOOL_NO_COMPILE=1``,
the torch update runs instead (the same least squares; a test holds the two equal to 1e-12).

Only our own source string is compiled, never anything read from a file; the library is written to a
private temporary folder and moved into place atomically, so concurrent first uses do not collide.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from .._files import cache_folder

SOURCE = r"""
#include <stdint.h>

/* One observation over the n columns of one tensor (see DeviceState.observe for the algebra):
   y = w - b, e = y - a*rho (where frozen: e = 0 and y = y - e, a*rho up to rounding), squares[lane] += e*e,
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
        if (frozen) {  /* without a branch on the (random) mask: k * e is e or 0 exactly */
            const double k = (double)frozen[i];
            y -= k * e;
            e -= k * e;
        }
        squares[m] += e * e;
        a[i] = (a[i] + grow * y * r) * inverse_ratio[m];
        b[i] += mean_step * y;
    }
    sums[0] += s_norm;
    sums[1] += s_disp;
    sums[2] += s_cent;
}

/* Embedded CMD at a window: each fit against the raw reference (a / scale, b - offset * that), its
   squared change since the snapshot, which then becomes the fit. */
void cmd_change(int64_t n, const double *a, const double *b, const int32_t *where, const double *scale,
                const double *offset, double *snap_a, double *snap_b, double *change)
{
    for (int64_t i = 0; i < n; i++) {
        const int32_t m = where[i];
        const double a_raw = a[i] / scale[m];
        const double b_raw = b[i] - offset[m] * a_raw;
        const double da = snap_a[i] - a_raw, db = snap_b[i] - b_raw;
        change[i] = da * da + db * db;
        snap_a[i] = a_raw;
        snap_b[i] = b_raw;
    }
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
# No FMA contraction and no fast-math: the loop rounds every product and sum. torch's vectorised
# add_/addcmul_ may fuse them (AVX2, AVX-512), so the two paths agree to about 1e-12, not bitwise.
FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]

_loaded: dict[tuple, object] = {}
_lock = threading.Lock()


def library():
    """The compiled functions (``.cmd_observe``, ``.cmd_change``, ``.cmd_hold``; a ctypes library), or None
    where they cannot be built (looked up once per process and setting of ``CMDTOOL_NO_COMPILE`` and ``CC``)."""
    setting = (os.environ.get("CMDTOOL_NO_COMPILE", ""), os.environ.get("CC", ""))
    with _lock:  # threads of one process compile once
        if setting not in _loaded:
            _loaded[setting] = None if setting[0] else _find()
        return _loaded[setting]


def _find():
    compiler = shlex.split(os.environ.get("CC", "")) or [
        next((c for c in map(shutil.which, ("cc", "gcc", "clang")) if c), "")]
    if not compiler[0]:
        return None
    key = hashlib.sha256("\0".join([SOURCE, *compiler, *FLAGS, platform.machine(), platform.system()]).encode())
    return _build_and_load(compiler, f"cmdtool-{key.hexdigest()[:16]}.so")


def _private(path: Path) -> bool:
    """Whether only this user can have written ``path`` (a file or folder): owned by us, and not
    writable by group or others. A library anyone else could replace is never loaded."""
    if not hasattr(os, "getuid"):
        return True
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _build_and_load(compiler: list[str], name: str):
    folder = cache_folder() / "lib"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / name
        if not _private(folder):
            raise PermissionError(f"{folder} is writable by others")
        if not path.is_file() or not _private(path):
            _compile(compiler, path)
        return _load(path)
    except subprocess.SubprocessError:  # the compiler failed: it would fail again
        return None
    except OSError:
        pass
    private = Path(tempfile.mkdtemp(prefix="cmdtool-"))  # a read-only or shared cache: this process's own
    try:
        _compile(compiler, private / name)
        return _load(private / name)  # Linux and macOS keep the mapping once the file is removed
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _load(path: Path):
    try:
        loaded = ctypes.CDLL(str(path))
        observe, hold, change = loaded.cmd_observe, loaded.cmd_hold, loaded.cmd_change
    except AttributeError:
        return None
    pointer, integer, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    observe.restype = hold.restype = change.restype = None
    change.argtypes = [integer, pointer, pointer, pointer, pointer, pointer, pointer, pointer, pointer]
    observe.argtypes = [pointer, integer, pointer, pointer, pointer, pointer, pointer, pointer, pointer,
                        real, real, pointer, pointer]
    hold.argtypes = [pointer, pointer, integer, pointer, pointer, pointer, pointer]
    return loaded


def _compile(compiler: list[str], library: Path) -> None:
    """Compile ``SOURCE`` into ``library``: built in a private folder, then moved into place atomically
    (readable and writable by this user only, whatever the umask)."""
    with tempfile.TemporaryDirectory(prefix="cmdtool-build-") as work:
        source, built = Path(work) / "cmdtool_fused.c", Path(work) / library.name
        source.write_text(SOURCE)
        subprocess.run([*compiler, *FLAGS, "-o", str(built), str(source)], check=True, capture_output=True,
                       timeout=120)
        handle, staged = tempfile.mkstemp(prefix=f".{library.name}.", dir=library.parent)
        try:
            with os.fdopen(handle, "wb") as out:  # mkstemp: mode 0600
                out.write(built.read_bytes())
            os.replace(staged, library)
        finally:
            if os.path.exists(staged):
                os.unlink(staged)
