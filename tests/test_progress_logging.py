"""Progress and logging (issue #18, item 7): one whole-grid progress display naming victim × defence × attack with an
ETA (a bar that stays on a terminal, INFO lines elsewhere), the library logging to the ``robustbench_med`` logger
without touching the root logger, and the CLI's ``--quiet`` / ``--verbose``."""
import io
import logging

import pytest
import yaml
from rank_helpers import linear_victim, tiny_grid

from robustbench_med import log as rbm_log
from robustbench_med.log import GridProgress

GRID = tiny_grid(name="progress", defenses=["identity.none"],
                 attacks=[{"name": "fgsm.linf", "params": {"eps": ["2/255", "8/255"]}}])
CELL = "linear.phantom × identity.none × fgsm.linf eps=2/255,8/255"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module", autouse=True)
def linear():
    with linear_victim() as name:
        yield name


@pytest.fixture
def cli_logging():
    """Undo what the CLI configures (a root handler, the package logger's level) after a test."""
    level = logging.getLogger("robustbench_med").level
    yield
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, rbm_log.TqdmHandler)]:
        root.removeHandler(h)
    logging.getLogger("robustbench_med").setLevel(level)


def test_on_a_terminal_the_bar_names_the_cell_and_stays():
    out = Terminal()
    progress = GridProgress(3, "grid g", stream=out)
    progress.running("v × d × pgd.linf eps=8/255")
    progress.advance(2)
    shown = str(progress.bar)  # what the bar shows now (tqdm redraws at most every 0.1 s)
    assert "v × d × pgd.linf eps=8/255" in shown and "2/3" in shown and "<" in shown  # cell, count, ETA
    progress.advance(1)
    progress.close()
    assert progress.bar.leave and "3/3" in out.getvalue().rsplit("\r", 1)[-1]  # the last state is left on screen


def test_off_a_terminal_no_bar_but_periodic_log_lines_with_eta(caplog):
    clock, out = Clock(), io.StringIO()
    caplog.set_level(logging.INFO, logger="robustbench_med")
    progress = GridProgress(4, "grid g", stream=out, clock=clock)
    assert progress.bar is None
    progress.running("v × d × a")  # the first line, when work starts
    clock.t = 10.0
    progress.advance(1)  # within LOG_EVERY_SECONDS of the first line: no line
    clock.t = 10.0 + rbm_log.LOG_EVERY_SECONDS
    progress.running("v × d × b")
    progress.advance(1)
    progress.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "robustbench_med.progress"]
    assert out.getvalue() == ""
    assert lines[0].startswith("grid g: 0/4 cells (0%), 0:00 elapsed; running v × d × a")
    assert lines[1] == "grid g: 2/4 cells (50%), 0:40 elapsed, ETA 0:40; running v × d × b"
    assert lines[2] == "grid g: 2/4 cells (50%), 0:40 elapsed, ETA 0:40; running v × d × b" and len(lines) == 3


def test_disabled_progress_shows_and_logs_nothing(caplog):
    out = Terminal()
    caplog.set_level(logging.INFO, logger="robustbench_med")
    progress = GridProgress(2, "grid g", enabled=False, stream=out)
    progress.running("v × d × a")
    progress.advance(2)
    progress.close()
    assert out.getvalue() == "" and not [r for r in caplog.records if r.levelno >= logging.INFO]


def test_a_run_logs_to_the_package_logger_names_each_cell_and_leaves_root_alone(tmp_path, caplog):
    from robustbench_med.grid import parse_grid
    from robustbench_med.runner import run_grid

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    caplog.set_level(logging.DEBUG, logger="robustbench_med")
    run_grid(parse_grid(GRID), tmp_path, progress=True)
    assert root.handlers == handlers and root.level == level
    assert [type(h) for h in logging.getLogger("robustbench_med").handlers] == [logging.NullHandler]
    names = {r.name for r in caplog.records}
    assert names and all(n == "robustbench_med" or n.startswith("robustbench_med.") for n in names)
    messages = [r.getMessage() for r in caplog.records]
    assert f"grid progress: running {CELL}" in messages  # the whole-grid display names victim × defence × attack
    assert messages[-1].startswith("grid progress: 2/2 cells (100%)")


def test_off_a_terminal_a_long_group_logs_between_its_units(tmp_path, caplog, monkeypatch):
    from robustbench_med.grid import parse_grid
    from robustbench_med.runner import run_grid

    monkeypatch.setattr(rbm_log, "LOG_EVERY_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="robustbench_med")
    run_grid(parse_grid(GRID), tmp_path, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "robustbench_med.progress"]
    during = [line for line in lines if line.startswith("grid progress: 0/2 cells") and line.endswith(f"running {CELL}")]
    assert len(during) == 2  # one per unit of 4 samples, before the group's cells are counted


def _run_cli(tmp_path, *flags):
    from robustbench_med.cli import main

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    return main(["run", str(grid), "--out", str(tmp_path / "out"), *flags])


def test_cli_default_shows_info_and_progress_lines(tmp_path, capsys, cli_logging):
    assert _run_cli(tmp_path) == 0
    captured = capsys.readouterr()
    assert "robustbench-med: grid 'progress' (1 victims" in captured.err
    assert "robustbench-med: grid progress: 0/2 cells (0%), 0:00 elapsed; running linear.phantom × identity.none\n" \
           "robustbench-med: grid progress: 2/2 cells (100%)" in captured.err  # off a terminal: lines, no bar
    assert "DEBUG" not in captured.err
    assert "fgsm.linf" in captured.out and "robust" in captured.out  # the final summary table


@pytest.mark.parametrize("flag", ["--quiet", "-q"])
def test_cli_quiet_silences_progress_and_info_logs(tmp_path, capsys, cli_logging, flag):
    assert _run_cli(tmp_path, flag) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "fgsm.linf" in captured.out  # the command's own output stays


def test_cli_verbose_shows_debug_logs(tmp_path, capsys, cli_logging):
    assert _run_cli(tmp_path, "-v") == 0
    err = capsys.readouterr().err
    assert f"DEBUG robustbench_med.progress: grid progress: running {CELL}" in err
    assert "INFO robustbench_med.cli: grid 'progress'" in err


@pytest.mark.parametrize("argv", [["list", "-v", "-q"], ["-v", "list", "-q"], ["--quiet", "list", "--verbose"]])
def test_cli_verbose_and_quiet_exclude_each_other(capsys, argv):
    from robustbench_med.cli import main

    with pytest.raises(SystemExit):
        main(argv)
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_verbosity_flags_work_before_the_subcommand_too(capsys, cli_logging):
    from robustbench_med.cli import main

    assert main(["-q", "list", "defenses"]) == 0
    assert logging.getLogger("robustbench_med").level == logging.WARNING
    assert main(["list", "defenses", "-v"]) == 0
    assert logging.getLogger("robustbench_med").level == logging.DEBUG
    assert "identity.none" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["run", "train", "list", "leaderboard", "merge", "verify", "check", "publish"])
def test_every_subcommand_takes_the_verbosity_flags(command):
    from robustbench_med.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    options = {o for a in sub._actions for o in a.option_strings}
    assert {"-v", "--verbose", "-q", "--quiet"} <= options
