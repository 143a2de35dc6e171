"""The run's progress line and the stderr filter that keeps Ray's and transformers' notices out."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

from vlray.pipeline.progress import Progress, progress_line


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_reads_rows_rate_errors_and_eta():
    assert progress_line(2500, 10000, 3, 40.0, 500.0) == (
        "progress   2,500 / 10,000 rows (25%)  500 images/s  3 errors  ETA 0:15"
    )
    assert progress_line(0, 96, 0, 12.4, None) == (
        "progress   0 / 96 rows (0%)  0 errors  starting (0:12 elapsed)"
    )
    assert progress_line(10, 7_210_000, 0, 5.0, 1000.0).endswith("ETA 2:00:10")


def test_rate_excludes_start_up_and_counts_rows_after_the_first_batch():
    clock = FakeClock()
    out = io.StringIO()
    progress = Progress(out, tty=False, clock=clock)
    progress.total = 1000
    clock.now += 20.0  # Ray, actors and the model starting: no rows
    progress.add(100, 1)  # first batch: the rate's clock starts here
    assert "starting (0:20 elapsed)" in progress.line()
    clock.now += 2.0
    progress.add(300, 2)
    assert progress.line() == (
        "progress   400 / 1,000 rows (40%)  150 images/s  3 errors  ETA 0:04"
    )


def test_terminal_redraws_in_place_a_log_gets_whole_lines():
    clock = FakeClock()
    tty, log = io.StringIO(), io.StringIO()
    for stream, is_tty in ((tty, True), (log, False)):
        progress = Progress(stream, tty=is_tty, clock=clock)
        progress.begin(50)  # draws at once
        progress.add(10, 0)
        progress.draw()
        progress.end()
    assert tty.getvalue().startswith("\rprogress   0 / 50 rows (0%)")
    assert "\x1b[K\rprogress   10 / 50 rows (20%)" in tty.getvalue()
    assert tty.getvalue().endswith("\r\x1b[K")  # the line is cleared for the summary
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("progress   10 / 50 rows (20%)")
    assert "\r" not in log.getvalue()


def test_stderr_filter_drops_only_the_named_lines():
    script = textwrap.dedent(
        """
        import logging, os, sys
        from vlray.quiet import quiet_stderr
        logging.basicConfig()
        with quiet_stderr() as terminal:
            os.write(2, b"[2026-12-03 12:15:27,591 E 4197 4197] core_worker.cc:2465: Actor "
                b"with class name: 'MapWorker(MapBatches(X))' and ID: 'ab' has constructor "
                b"arguments in the object store and max_restarts > 0. If the arguments\\n")
            os.write(2, b"a real problem\\n")
            print("\\x1b[36m(MapWorker(MapBatches(X)) pid=1)\\x1b[0m Loading weights:   0%|  | "
                "0/88\\rLoading weights: 100%|##| 88/88", file=sys.stderr)
            logging.getLogger("transformers.configuration_utils").warning(
                "Model config: bos_token_id must be `None` or an integer within the "
                "vocabulary (between 0 and 31999), got 49406.")
            logging.getLogger("ray._private.authentication.authentication_token_setup"
                ).warning("Token authentication is enabled for this Ray cluster.")
            logging.getLogger("vlray.x").warning("a real warning")
            terminal.write("progress line\\n")
        print("after", file=sys.stderr)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert sorted(done.stderr.splitlines()) == sorted(
        ["a real problem", "WARNING:vlray.x:a real warning", "progress line", "after"]
    )
