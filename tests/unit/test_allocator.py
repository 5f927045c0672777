"""Which allocator the process runs on, and the environment `serve` executes itself with."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import allocator
from proxy.allocator import (
    EXECUTED_MARK,
    MALLOC_CONF,
    AllocatorError,
    environment_to_execute,
    in_use,
)

JEMALLOC_LINE = "7f00-7f10 r-xp 0 08:01 42 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
LIBC_LINE = "7f20-7f30 r-xp 0 08:01 43 /usr/lib/x86_64-linux-gnu/libc.so.6\n"


def found(name: str) -> str | None:
    assert name == "jemalloc"
    return "libjemalloc.so.2"


def missing(name: str) -> str | None:
    return None


@pytest.mark.parametrize(
    ("lines", "pythonmalloc", "expected"),
    [
        ([LIBC_LINE, JEMALLOC_LINE], "malloc", "jemalloc"),
        ([LIBC_LINE, JEMALLOC_LINE], None, "pymalloc"),  # preloaded, but objects in pymalloc
        ([LIBC_LINE], "malloc", "malloc"),
        ([LIBC_LINE], None, "pymalloc"),
    ],
)
def test_in_use_reads_the_maps(
    tmp_path: Path, lines: list[str], pythonmalloc: str | None, expected: str
) -> None:
    maps = tmp_path / "maps"
    maps.write_text("".join(lines))
    environ = {"PYTHONMALLOC": pythonmalloc} if pythonmalloc else {}
    assert in_use(str(maps), environ) == expected


def test_in_use_without_proc_is_the_default(tmp_path: Path) -> None:
    assert in_use(str(tmp_path / "absent"), {}) == "pymalloc"


def test_auto_executes_with_jemalloc_in_front_of_an_existing_preload() -> None:
    environ = {"LD_PRELOAD": "libother.so", "PATH": "/bin"}
    env = environment_to_execute("auto", environ, running="pymalloc", find_library=found)
    assert env is not None
    assert env["LD_PRELOAD"] == "libjemalloc.so.2:libother.so"
    assert (env["PYTHONMALLOC"], env["MALLOC_CONF"], env[EXECUTED_MARK]) == (
        "malloc",
        MALLOC_CONF,
        "auto",
    )
    assert env["PATH"] == "/bin"
    assert environ == {"LD_PRELOAD": "libother.so", "PATH": "/bin"}, "the caller's copy kept"


def test_an_operators_malloc_conf_wins() -> None:
    env = environment_to_execute(
        "auto", {"MALLOC_CONF": "narenas:1"}, running="pymalloc", find_library=found
    )
    assert env is not None and env["MALLOC_CONF"] == "narenas:1"
    assert env["LD_PRELOAD"] == "libjemalloc.so.2"


@pytest.mark.parametrize("setting", ["auto", "jemalloc"])
def test_nothing_to_do_when_jemalloc_already_serves(setting: str) -> None:
    assert environment_to_execute(setting, {}, running="jemalloc", find_library=found) is None


def test_system_never_executes() -> None:
    assert environment_to_execute("system", {}, running="pymalloc", find_library=found) is None


def test_auto_without_the_library_goes_on() -> None:
    assert environment_to_execute("auto", {}, running="pymalloc", find_library=missing) is None


def test_required_without_the_library_fails_with_the_package_name() -> None:
    with pytest.raises(AllocatorError, match="apt install libjemalloc2"):
        environment_to_execute("jemalloc", {}, running="pymalloc", find_library=missing)


def test_executed_once_and_still_not_on_jemalloc_never_loops() -> None:
    """ld.so ignores a preload it cannot open: the second process must not exec a third."""
    marked = {EXECUTED_MARK: "auto"}
    assert environment_to_execute("auto", marked, running="pymalloc", find_library=found) is None
    with pytest.raises(AllocatorError, match="could not be preloaded"):
        environment_to_execute("jemalloc", marked, running="pymalloc", find_library=found)


def test_the_default_setting_is_auto() -> None:
    from proxy.config import ServerConfig

    assert ServerConfig().allocator == "auto"
    assert allocator.JEMALLOC == "jemalloc"
