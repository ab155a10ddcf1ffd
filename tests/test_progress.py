"""ekf_plugin.progress: tqdm bars that keep a log file readable."""

from __future__ import annotations

import io
import time

from ekf_plugin.progress import LOG_INTERVAL_S, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_a_refresh_every_log_interval_a_terminal_every_tenth_of_a_second():
    log, tty = io.StringIO(), _Terminal()
    with progress_bar(range(5), file=log, desc="frames") as bar:
        assert bar.mininterval == LOG_INTERVAL_S >= 10
        assert list(bar) == [0, 1, 2, 3, 4]
    with progress_bar(total=3, file=tty) as bar:
        assert bar.mininterval == 0.1
        bar.update(3)
    assert "frames" in log.getvalue() and "5/5" in log.getvalue()  # the final state is still written
    assert "3/3" in tty.getvalue()


def test_a_log_file_is_not_flooded_by_many_fast_iterations():
    log, tty = io.StringIO(), _Terminal()
    for out in (log, tty):
        for _ in progress_bar(range(40), file=out):
            time.sleep(0.01)  # 0.4 s of work: a terminal's bar refreshes about every 0.1 s
    assert log.getvalue().count("\r") <= 3  # start and end only
    assert tty.getvalue().count("\r") >= 4
    assert progress_bar(range(1), file=log, mininterval=1.0).mininterval == 1.0  # an explicit choice is kept
