"""Configuration: the workers default and limit, `.env` encoding, typos, and the dask address's form."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from starlette_concurrency import Concurrency, ConfigurationError, DaskOptions, ProcessOptions
from starlette_concurrency._config import WORKERS_PER_CPU, Settings, _warned, usable_cpus


@pytest.fixture(autouse=True)
def _fresh_warnings() -> Iterator[None]:
    # A typo warns once per process; each test starts as if none had been seen.
    _warned.clear()
    yield
    _warned.clear()


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_usable_cpus_is_the_affinity_mask_without_a_quota(tmp_path: Path) -> None:
    assert usable_cpus(tmp_path) == len(os.sched_getaffinity(0))
    write(tmp_path, {"proc/self/cgroup": "0::/app\n", "sys/fs/cgroup/app/cpu.max": "max 100000\n"})
    assert usable_cpus(tmp_path) == len(os.sched_getaffinity(0))
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


def test_a_cgroup_v2_quota_caps_the_cpus_even_on_an_ancestor(tmp_path: Path) -> None:
    write(tmp_path, {"proc/self/cgroup": "0::/app/web\n", "sys/fs/cgroup/app/cpu.max": "50000 100000\n"})
    assert usable_cpus(tmp_path) == 1  # half a CPU rounds up to one
    write(tmp_path, {"sys/fs/cgroup/app/cpu.max": "150000 100000\n"})
    assert usable_cpus(tmp_path) == min(2, len(os.sched_getaffinity(0)))


def test_a_cgroup_v1_quota_caps_the_cpus(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "proc/self/cgroup": "5:memory:/x\n4:cpu,cpuacct:/docker/abc\n",
            "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "100000\n",
            "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        },
    )
    assert usable_cpus(tmp_path) == 1
    write(tmp_path, {"sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "-1\n"})
    assert usable_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_the_default_worker_count_is_a_number_drivers_can_use() -> None:
    assert Concurrency("sync", env_file=None).settings.workers == usable_cpus()
    assert Settings().workers == usable_cpus()


def test_absurd_worker_counts_are_refused_naming_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    limit = WORKERS_PER_CPU * usable_cpus()
    assert Concurrency("sync", workers=limit, env_file=None).settings.workers == limit
    with pytest.raises(ConfigurationError, match=rf"^workers must be at most {limit} \(64 per usable CPU\), got"):
        Concurrency("sync", workers=limit + 1, env_file=None)
    monkeypatch.setenv("CONCURRENCY_WORKERS", "100000")
    with pytest.raises(ConfigurationError, match=rf"^CONCURRENCY_WORKERS must be at most {limit} .*got 100000"):
        Concurrency("sync", env_file=None)


def test_a_dotenv_file_that_is_not_utf8_names_the_file_and_line(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_bytes(b"CONCURRENCY_DRIVER=sync\n# caf\xe9\nCONCURRENCY_WORKERS=2\n")
    with pytest.raises(ConfigurationError, match=rf"^{env_file}, line 2: not UTF-8 \(byte 0xe9 at column 6\)"):
        Concurrency(env_file=env_file)


def test_a_byte_order_mark_does_not_hide_the_first_setting(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_bytes("\ufeffCONCURRENCY_DRIVER=sync\nCONCURRENCY_WORKERS=3\n".encode())
    settings = Concurrency(env_file=env_file).settings
    assert (settings.driver, settings.workers) == ("sync", 3)


def test_export_lines_set_their_variable_as_python_dotenv_reads_them(tmp_path: Path) -> None:
    # A `.env` that the shell can `source` (python-dotenv reads these lines the same way).
    env_file = tmp_path / ".env"
    env_file.write_text(
        "export CONCURRENCY_WORKERS=3\n"
        "export\tCONCURRENCY_TIMEOUT = '2.5'\n"
        "# export CONCURRENCY_DRIVER=fork\n"
        "exported_NAME=1\n"
        "export CONCURRENCY_DRIVER=sync\n"
    )
    settings = Concurrency(env_file=env_file).settings
    assert (settings.driver, settings.workers, settings.timeout) == ("sync", 3, 2.5)
    assert settings.variables == {
        "CONCURRENCY_WORKERS": "3",
        "CONCURRENCY_TIMEOUT": "2.5",
        "CONCURRENCY_DRIVER": "sync",
    }


def test_a_later_line_of_the_dotenv_file_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("CONCURRENCY_WORKERS=2\nexport CONCURRENCY_WORKERS=5\nCONCURRENCY_DRIVER=sync\n")
    assert Concurrency(env_file=env_file).settings.workers == 5


def test_a_misspelt_variable_warns_once_with_the_closest_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCURRENCY_WORKER", "3")
    expected = r"unknown setting CONCURRENCY_WORKER in the environment is ignored; did you mean CONCURRENCY_WORKERS\?"
    with pytest.warns(UserWarning, match=expected):
        Concurrency("sync", env_file=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Concurrency("sync", env_file=None)


def test_a_misspelt_variable_in_the_dotenv_file_warns_naming_the_file(tmp_path: Path) -> None:
    env_file = tmp_path / "app.env"
    env_file.write_text("CONCURRENCY_TIMEOUTS=3\nCONCURRENCY_ZZZ=1\n")
    with pytest.warns(UserWarning, match="unknown setting") as records:
        Concurrency("sync", env_file=env_file)
    messages = sorted(str(record.message) for record in records)
    where = repr(str(env_file))
    assert (
        messages[0] == f"unknown setting CONCURRENCY_TIMEOUTS in {where} is ignored; did you mean CONCURRENCY_TIMEOUT?"
    )
    assert messages[1].startswith(
        f"unknown setting CONCURRENCY_ZZZ in {str(env_file)!r} is ignored; known: CONCURRENCY_"
    )
    assert records[0].filename == __file__  # the warning points at the caller's line


def test_a_missing_env_file_warns_only_when_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Concurrency().settings.driver == "process"  # the default ".env", absent: nothing to say
    missing = tmp_path / "prod.env"
    with pytest.warns(UserWarning, match=rf"^env_file {str(missing)!r} does not exist"):
        assert Concurrency(env_file=missing).settings.driver == "process"


@pytest.mark.parametrize(
    "address", ["tcp://10.0.0.1:8786", "scheduler.internal:8786", "tls://[::1]:8786", " tcp://h:1 "]
)
def test_a_dask_address_of_the_right_form_is_accepted(address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        Concurrency("sync", options=DaskOptions(address=address), env_file=None)
        .settings.options_for(DaskOptions)
        .address
        == address.strip()
    )
    monkeypatch.setenv("CONCURRENCY_DASK_ADDRESS", address)
    assert Concurrency("sync", env_file=None).settings.options_for(DaskOptions).address == address.strip()


@pytest.mark.parametrize("address", ["tcp://scheduler", "scheduler", "tcp//h:1", "h:99999", "h:0", "a b:1", "tcp://:1"])
def test_a_dask_address_of_the_wrong_form_is_refused_at_construction(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigurationError, match=r"^DaskOptions\.address must look like 'tcp://host:8786'"):
        Concurrency("sync", options=DaskOptions(address=address), env_file=None)
    monkeypatch.setenv("CONCURRENCY_DASK_ADDRESS", address)
    with pytest.raises(ConfigurationError, match=r"^CONCURRENCY_DASK_ADDRESS must look like"):
        Concurrency("sync", env_file=None)
    with pytest.raises(ConfigurationError, match=r"^DaskOptions\.address must be a string"):
        Concurrency("sync", options=DaskOptions(address=8786), env_file=None)  # type: ignore[arg-type]


# Numbers are finite and bounded; an error repeats at most a short prefix of a bad value --------------------

RANGE = r"must be positive and at most 86400 \(seconds: one day\), got"


@pytest.mark.parametrize("raw", ["inf", "Infinity", "1e400", "-inf", "nan", "86400.5"])
@pytest.mark.parametrize("variable", ["CONCURRENCY_DRAIN_TIMEOUT", "CONCURRENCY_TIMEOUT"])
def test_a_duration_variable_out_of_range_is_refused_with_the_range(
    variable: str, raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, raw)
    with pytest.raises(ConfigurationError, match=rf"^{variable} {RANGE} (inf|-inf|nan|86400\.5)$"):
        Concurrency("sync", env_file=None)


def test_a_duration_at_the_bound_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCURRENCY_DRAIN_TIMEOUT", "86400")
    monkeypatch.setenv("CONCURRENCY_TIMEOUT", "0.001")
    settings = Concurrency("sync", env_file=None).settings
    assert (settings.drain_timeout, settings.timeout) == (86400.0, 0.001)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e300])
def test_an_explicit_duration_out_of_range_is_refused_with_the_range(value: float) -> None:
    with pytest.raises(ConfigurationError, match=rf"^timeout {RANGE}"):
        Concurrency("sync", timeout=value, env_file=None)
    with pytest.raises(ConfigurationError, match=rf"^drain_timeout {RANGE}"):
        Concurrency("sync", drain_timeout=value, env_file=None)
    with pytest.raises(ConfigurationError, match=rf"^ProcessOptions\.idle_timeout {RANGE}"):
        ProcessOptions(idle_timeout=value)


@pytest.mark.anyio
async def test_a_run_timeout_out_of_range_is_refused_with_the_range() -> None:
    async with Concurrency(driver="sync", env_file=None) as concurrency:
        with pytest.raises(ValueError, match=rf"^timeout {RANGE} inf$"):
            await concurrency.run(lambda: 1, timeout=math.inf)


HUGE = 20_000_000  # characters: a variable someone filled by mistake (or on purpose)


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("CONCURRENCY_WORKERS", "x" * HUGE),
        ("CONCURRENCY_WORKERS", "9" * HUGE),  # more digits than int() will read
        ("CONCURRENCY_TIMEOUT", "z" * HUGE),
        ("CONCURRENCY_DRAIN_TIMEOUT", "9" * HUGE),  # a float this long is inf
        ("CONCURRENCY_DASK_ADDRESS", "tcp://" + "h" * HUGE),
    ],
)
def test_an_error_quotes_only_a_prefix_of_a_huge_value(
    variable: str, raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, raw)
    with pytest.raises(ConfigurationError, match=rf"^{variable} must") as caught:
        Concurrency("sync", env_file=None)
    message = str(caught.value)
    assert len(message) < 300, message[:300]
    if raw[-1] != "9":  # the ones that could not be parsed say how long they were
        assert f"... ({len(raw)} characters)" in message


def test_an_explicit_argument_is_quoted_short_too() -> None:
    with pytest.raises(ConfigurationError, match=r"^timeout must be a positive float, not str 'xxx") as caught:
        Concurrency("sync", timeout="x" * HUGE, env_file=None)  # type: ignore[arg-type]
    assert len(str(caught.value)) < 200
    with pytest.raises(ConfigurationError, match=r"^workers must be at most \d+ .*, got <int>$"):
        Concurrency("sync", workers=10**5000, env_file=None)
    with pytest.raises(ConfigurationError, match=r"^DaskOptions\.address must look like .*\(6000006 characters\)$"):
        Concurrency("sync", options=DaskOptions(address="tcp://" + "h" * 6_000_000), env_file=None)
