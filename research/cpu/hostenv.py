"""Process-level settings that must be in place before the process starts: glibc malloc tunables.

Why: XLA:CPU allocates each execution's temporary buffer afresh (540 MB for a YOLOv5s 640 px
batch-2 train step) with `posix_memalign` on one of its worker threads. glibc serves an allocation
that large from a thread arena by `mmap` and returns it with `munmap`, so every step faults in
and zeroes its scratch memory again in 4 KiB pages (about 132,000 page faults per step). With
the glibc tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks for transparent huge pages
on the memory it maps (`madvise(MADV_HUGEPAGE)`): 2 MiB faults instead of 4 KiB ones and fewer
TLB misses in every kernel that walks large activations. The train step measured 12-20 % faster
(docs/yolov5.md, "Benchmark"); results are bit-identical (only where memory comes from changes).

glibc reads tunables once, at process start, so `launch.py` re-executes itself with them set
(`reexec_with_tunables`); `run.sh` exports them for the tests. `RESEARCH_MALLOC_TUNABLES=0` opts
out. Nothing happens off Linux/glibc, on an older glibc, or where transparent huge pages are
disabled (`/sys/kernel/mm/transparent_hugepage/enabled` = never).
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = ("glibc.malloc.hugetlb=1",)
OPT_OUT = "RESEARCH_MALLOC_TUNABLES"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, ...]:
    lib, version = platform.libc_ver()
    if lib != "glibc" or not version:
        return ()
    try:
        return tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return ()


def _thp_mode(path: str = _THP) -> str:
    """'always', 'madvise' or 'never' (the bracketed entry); '' if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else ""


def why_not(environ=None, glibc: tuple[int, ...] | None = None, thp: str | None = None) -> str:
    """Why the tunables do not apply here ('' when they do)."""
    environ = os.environ if environ is None else environ
    glibc = _glibc_version() if glibc is None else glibc
    thp = _thp_mode() if thp is None else thp
    value = environ.get(OPT_OUT, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{OPT_OUT}={value!r}: expected 0 (no malloc tunables) or 1 (the default)")
    if value == "0":
        return f"{OPT_OUT}=0"
    if not sys.platform.startswith("linux") or not glibc:
        return "not Linux with glibc"
    if glibc < (2, 35):
        return f"glibc {'.'.join(map(str, glibc))} has no glibc.malloc.hugetlb (needs >= 2.35)"
    if thp in ("", "never"):
        return "transparent huge pages are disabled" if thp == "never" else "transparent huge pages unknown"
    return ""


def merged_tunables(current: str) -> str:
    """GLIBC_TUNABLES with ours added; a key the user already set keeps the user's value."""
    items = [t for t in current.split(":") if t]
    keys = {t.split("=", 1)[0] for t in items}
    return ":".join(items + [t for t in TUNABLES if t.split("=", 1)[0] not in keys])


def without_ours(current: str) -> str:
    """GLIBC_TUNABLES with our entries taken out (how a process runs that was not started by us)."""
    return ":".join(t for t in current.split(":") if t and t not in TUNABLES)


def needs_reexec(environ=None, **probe) -> bool:
    environ = os.environ if environ is None else environ
    if why_not(environ, **probe):
        return False
    return merged_tunables(environ.get("GLIBC_TUNABLES", "")) != environ.get("GLIBC_TUNABLES", "")


def reexec_with_tunables() -> None:
    """Replaces this process by the same command line with the tunables set (same pid, argv,
    interpreter options), if they apply and are not set yet. Call it before anything else runs."""
    if not needs_reexec():
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = merged_tunables(env.get("GLIBC_TUNABLES", ""))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)


def active() -> dict:
    """What this process runs with (for logs and benchmark.json)."""
    current = os.environ.get("GLIBC_TUNABLES", "")
    reason = why_not()
    return {"GLIBC_TUNABLES": current, "applies": not reason,
            "reason": reason or ("set" if merged_tunables(current) == current else "not set in this process"),
            "transparent_hugepage": _thp_mode()}


if __name__ == "__main__":  # prints GLIBC_TUNABLES to export (run.sh), or nothing where they do not apply
    if needs_reexec():
        print(merged_tunables(os.environ.get("GLIBC_TUNABLES", "")))
