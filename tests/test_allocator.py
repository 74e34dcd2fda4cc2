"""mpiblmm.allocator: glibc's trim threshold is raised unless the user chose one."""

from mpiblmm.allocator import keep_freed_memory


def test_trim_threshold_is_set_on_glibc():
    # Debian (CI, the supported platform) has glibc
    assert keep_freed_memory(environ={}) is True


def test_users_own_setting_wins():
    assert keep_freed_memory(environ={"MALLOC_TRIM_THRESHOLD_": "131072"}) is False


def test_the_cli_sets_it_before_any_command(monkeypatch):
    import mpiblmm.cli as cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(cli, "_main", lambda args: 0)
    assert cli.main(["simulate", "x"]) == 0
    assert calls == [1]


def test_users_mmap_setting_wins_too():
    assert keep_freed_memory(environ={"MALLOC_MMAP_THRESHOLD_": "1048576"}) is False
