"""The one progress style of the commands: step lines and bars (terminal: redrawn; log: whole lines)."""

import io

from reg2d3d_ros import progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_step_lines_are_numbered_timed_and_end_an_open_bar(monkeypatch):
    out, err = io.StringIO(), _Tty()
    monkeypatch.setattr("sys.stderr", err)
    step = progress.Steps(3, stream=out)
    step("loading the CT")
    progress.bar("rendering frames", 1, 4, 0.5)  # left open on the terminal
    step.note("detail")
    step("simulating")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[1/3, 0 s] loading the CT")
    assert lines[1].strip() == "detail" and lines[1].startswith(" " * 10)
    assert lines[2].startswith("[2/3, ") and lines[2].endswith("] simulating")
    assert err.getvalue().startswith("\rrendering frames [#######") and err.getvalue().endswith("\n")  # ended before the step line
    unnumbered = progress.Steps(stream=out)
    unnumbered("x")
    assert out.getvalue().splitlines()[-1] == "[0 s] x"


def test_bar_in_a_log_prints_whole_lines_at_the_start_and_end_only():
    log = io.StringIO()
    with progress.Bar("views", 100, stream=log) as b:
        for _ in range(100):
            b.advance(extra="loss 0.1")
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue()  # start and end (the loop took far less than LOG_EVERY_S)
    assert lines[0].startswith("views [") and " 1/100 " in lines[0]
    assert lines[1].startswith("views [" + "#" * progress.BAR_WIDTH + "] 100/100") and lines[1].endswith("loss 0.1")
    quiet = io.StringIO()
    with progress.Bar("views", 3, enabled=False, stream=quiet) as b:
        b.advance()
    assert quiet.getvalue() == ""


def test_bar_text():
    assert progress.format_bar("x", 15, 60, 30.0) == "x [#######.......................] 15/60 30 s, 90 s left"
    assert progress.format_bar("x", 0, 60, 0.0, "a").endswith("0/60 0 s, ? s left a")
