"""glibc malloc tunables: when they apply, how they merge, and that launch.py re-executes with them."""

import os
import subprocess
import sys

import pytest

from research.cpu import hostenv

from conftest import ROOT


def test_why_not_covers_each_condition():
    ok = dict(glibc=(2, 36), thp="madvise")
    assert hostenv.why_not({}, **ok) == ""
    assert hostenv.why_not({hostenv.OPT_OUT: "0"}, **ok) == f"{hostenv.OPT_OUT}=0"
    assert "needs >= 2.35" in hostenv.why_not({}, glibc=(2, 31), thp="always")
    assert hostenv.why_not({}, glibc=(), thp="always") == "not Linux with glibc"
    assert hostenv.why_not({}, glibc=(2, 36), thp="never") == "transparent huge pages are disabled"
    with pytest.raises(ValueError, match="RESEARCH_MALLOC_TUNABLES='off': expected 0"):
        hostenv.why_not({hostenv.OPT_OUT: "off"}, **ok)  # a typo is not silently the default


def test_merge_keeps_user_values_and_other_tunables():
    assert hostenv.merged_tunables("") == "glibc.malloc.hugetlb=1"
    assert hostenv.merged_tunables("glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hostenv.merged_tunables("glibc.malloc.hugetlb=0") == "glibc.malloc.hugetlb=0"  # the user's choice wins
    ok = dict(glibc=(2, 36), thp="madvise")
    assert hostenv.needs_reexec({}, **ok)
    assert not hostenv.needs_reexec({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, **ok)  # no exec loop
    assert not hostenv.needs_reexec({hostenv.OPT_OUT: "0"}, **ok)
    assert not hostenv.needs_reexec({}, glibc=(2, 36), thp="never")


def test_thp_mode_reads_the_bracketed_entry(tmp_path):
    p = tmp_path / "enabled"
    p.write_text("always [madvise] never\n")
    assert hostenv._thp_mode(str(p)) == "madvise"
    assert hostenv._thp_mode(str(tmp_path / "missing")) == ""


_PROBE = ("import os, sys; sys.path.insert(0, {root!r}); from research.cpu import hostenv; "
          "print('pid', os.getpid(), flush=True); hostenv.reexec_with_tunables(); "
          "print('env', os.environ.get('GLIBC_TUNABLES', ''), 'pid', os.getpid(), 'argv', sys.argv[1:])")


@pytest.mark.skipif(bool(hostenv.why_not({})), reason=f"tunables do not apply here: {hostenv.why_not({})}")
def test_reexec_sets_tunables_keeps_pid_and_arguments():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostenv.OPT_OUT)}
    env["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=4"
    out = subprocess.run([sys.executable, "-c", _PROBE.format(root=ROOT), "--a=1", "b"], env=env,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    first_pid = out[0].split()[1]
    assert out[1].split() == ["pid", first_pid]  # printed again by the re-executed process
    assert out[2] == (f"env glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1 pid {first_pid} "
                      "argv ['--a=1', 'b']")
    env[hostenv.OPT_OUT] = "0"
    out = subprocess.run([sys.executable, "-c", _PROBE.format(root=ROOT)], env=env,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[1].startswith("env glibc.malloc.arena_max=4 pid")  # opted out: no re-exec


@pytest.mark.skipif(bool(hostenv.why_not({})), reason=f"tunables do not apply here: {hostenv.why_not({})}")
def test_launch_reexecs_before_parsing_flags():
    """launch.py run as __main__ re-executes itself; the atexit hook runs only in the final process."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostenv.OPT_OUT)}
    code = ("import atexit, os, runpy, sys; sys.argv = ['launch.py', '--helpshort']; "
            "atexit.register(lambda: print('TUNABLES', os.environ.get('GLIBC_TUNABLES'))); "
            "runpy.run_path('launch.py', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert "--workdir" in p.stdout, p.stderr[-2000:]
    assert [line for line in p.stdout.splitlines() if line.startswith("TUNABLES")] == \
        ["TUNABLES glibc.malloc.hugetlb=1"]


def test_module_prints_what_run_sh_exports():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostenv.OPT_OUT)}
    run = lambda e: subprocess.run([sys.executable, "-m", "research.cpu.hostenv"], env=e, cwd=ROOT,  # noqa: E731
                                   capture_output=True, text=True, check=True).stdout.strip()
    assert run(env) == ("" if hostenv.why_not({}) else "glibc.malloc.hugetlb=1")
    assert run({**env, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) == ""  # already set
    assert run({**env, hostenv.OPT_OUT: "0"}) == ""
