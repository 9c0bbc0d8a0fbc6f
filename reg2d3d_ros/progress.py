"""One progress style for every command that runs longer than a few seconds.

Two forms, used by the demo, ``prepare``, the simulator, the evaluations and the training commands:

**Step lines** (:class:`Steps`): one line per step of a command, numbered when the number of
steps is known, with the time since the command started, and indented detail lines under it::

    [2/5, 14 s] simulating 60 frames around T8 (sweep motion, lateral view, 256x256)
                wrote the simulated sequence to demo_output/sequence_bag

**Bars** (:class:`Bar`, or :func:`bar` for code that keeps its own counter and clock) for loops
over frames, views, batches or epochs::

    rendering frames [#########.....................] 18/60 12 s, 28 s left

On a terminal a bar is redrawn in place (carriage return, at most ten times a second); in a log
file or a pipe it prints a full line at the start, at most every ``every_s`` seconds (10), and
at the end, so that logs stay readable. Bars go to stderr, step lines to the stream the command
chooses (stdout for the demo, stderr for ``prepare``). A step line first ends a bar line left
open on stderr.
"""

from __future__ import annotations

import sys
import time

#: Characters of a bar.
BAR_WIDTH = 30
#: A bar printed to a file or pipe prints at most one line per this many seconds (start and end always).
LOG_EVERY_S = 10.0
#: A bar on a terminal is redrawn at most this often (seconds; the end always).
TTY_EVERY_S = 0.1

_open_lines: set = set()  # ids of the streams whose last write was a bar line without a newline
_last_print: dict = {}  # (id(stream), what) -> monotonic time of the last line printed for that bar


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def end_line(stream=None) -> None:
    """End a bar line left open (redrawn in place) on ``stream`` (default stderr); nothing otherwise."""
    stream = sys.stderr if stream is None else stream
    if id(stream) in _open_lines:
        _open_lines.discard(id(stream))
        print(file=stream, flush=True)


def format_bar(what: str, done: int, total: int, elapsed_s: float, extra: str = "") -> str:
    """The text of a bar: ``what [###...] done/total E s, L s left extra``.

    Parameters
    ----------
    what : str
        What is counted (``rendering frames``, ``SCR epoch 3/24``).
    done, total : int
        Items done and in all.
    elapsed_s : float
        Seconds since the loop started (the time left is extrapolated from it).
    extra : str
        Appended (e.g. a running loss).
    """
    frac = min(1.0, done / max(1, total))
    left = elapsed_s / frac - elapsed_s if frac > 0 else float("nan")
    n = int(BAR_WIDTH * frac)
    left_text = f"{left:.0f} s left" if left == left else "? s left"
    return f"{what} [{'#' * n}{'.' * (BAR_WIDTH - n)}] {done}/{total} {elapsed_s:.0f} s, {left_text}" + (f" {extra}" if extra else "")


def bar(what: str, done: int, total: int, elapsed: float, extra: str = "", stream=None) -> None:
    """Show a bar's state (stateless form: the caller counts and times).

    Drop-in for the ``_bar(what, done, total, elapsed, extra)`` helpers the training loops
    used; end the loop with :func:`end_line` (a no-op when nothing is left open).

    Parameters
    ----------
    what, done, total, elapsed, extra
        As :func:`format_bar` (``elapsed`` in seconds).
    stream : file, optional
        Default stderr.
    """
    stream = sys.stderr if stream is None else stream
    now = time.monotonic()
    key = (id(stream), what)
    last = _last_print.get(key)
    final = done >= total
    tty = _is_tty(stream)
    if not final and last is not None and now - last < (TTY_EVERY_S if tty else LOG_EVERY_S):
        return
    _last_print[key] = now
    text = format_bar(what, done, total, elapsed, extra)
    if tty:
        print(f"\r{text} ", end="", file=stream, flush=True)
        _open_lines.add(id(stream))
    else:
        print(text, file=stream, flush=True)
    if final:
        _last_print.pop(key, None)


class Bar:
    """A progress bar over ``total`` items (see the module docstring for the style).

    Parameters
    ----------
    what : str
        What is counted.
    total : int
        Number of items.
    enabled : bool
        False: print nothing (a command's ``--quiet``).
    stream : file, optional
        Default stderr.

    Examples
    --------
    >>> with Bar("rendering frames", 60) as b:    # doctest: +SKIP
    ...     for f in range(60):
    ...         render(f)
    ...         b.advance()
    """

    def __init__(self, what: str, total: int, enabled: bool = True, stream=None):
        self.what = what
        self.total = int(total)
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.done = 0
        self.t0 = time.monotonic()

    def update(self, done: int, extra: str = "") -> None:
        """Set the number of items done (and an extra text)."""
        self.done = int(done)
        if self.enabled:
            bar(self.what, self.done, self.total, time.monotonic() - self.t0, extra, self.stream)

    def advance(self, n: int = 1, extra: str = "") -> None:
        """Count ``n`` more items done."""
        self.update(self.done + n, extra)

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled:
            end_line(self.stream)

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Steps:
    """Numbered step lines of a command, with the time since it started.

    Parameters
    ----------
    total : int, optional
        Number of steps (None: steps are not numbered).
    stream : file, optional
        Default stdout.
    enabled : bool
        False: print nothing.
    t0 : float, optional
        ``time.monotonic()`` the command started at (default: now).
    """

    def __init__(self, total: int | None = None, stream=None, enabled: bool = True, t0: float | None = None):
        self.total = total
        self.stream = sys.stdout if stream is None else stream
        self.enabled = enabled
        self.t0 = time.monotonic() if t0 is None else t0
        self.index = 0

    def elapsed(self) -> float:
        """Seconds since the command started."""
        return time.monotonic() - self.t0

    def prefix(self) -> str:
        """``[k/n, T s]`` (or ``[T s]`` without a number of steps) for the current step."""
        t = f"{self.elapsed():.0f} s"
        return f"[{self.index}/{self.total}, {t}]" if self.total else f"[{t}]"

    def __call__(self, message: str) -> None:
        """Start the next step: print its line."""
        self.index += 1
        self._print(f"{self.prefix()} {message}")

    def note(self, message: str) -> None:
        """A detail line of the current step, indented under its text."""
        self._print(" " * (len(self.prefix()) + 1) + message)

    def _print(self, line: str) -> None:
        if not self.enabled:
            return
        end_line(sys.stderr)
        if self.stream is not sys.stderr:
            end_line(self.stream)
        print(line, file=self.stream, flush=True)
