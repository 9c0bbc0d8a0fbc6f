"""User-facing errors.

Every error a user can cause (a wrong path, a corrupt file, an image in the wrong encoding) is
raised as a subclass of :class:`Reg2D3DError` with a message that says what was wrong and what
to do. Command-line entry points catch :class:`Reg2D3DError` and print the message without a
traceback; programming errors (bugs) are not wrapped and keep their traceback.
"""


class Reg2D3DError(Exception):
    """Base class for errors caused by user input or the environment, not by a bug."""


class CTLoadError(Reg2D3DError):
    """A CT volume or label map could not be read or is not a usable 3-D volume."""


class ModelLoadError(Reg2D3DError):
    """A model file is missing, corrupt or incompatible."""


class ImageError(Reg2D3DError):
    """An input X-ray frame cannot be used (encoding, size, NaN or constant pixels)."""


class ConfigError(Reg2D3DError):
    """A parameter or configuration value is out of range or inconsistent."""


class DataNotFoundError(Reg2D3DError):
    """Example or cached data is missing (run the set-up script)."""


def run_cli(fn, prog: str) -> int:
    """Run a command-line entry point's body: a user's error is one line on stderr, not a traceback.

    Parameters
    ----------
    fn : callable
        The body; an ``int`` it returns is the exit status (anything else means 0).
    prog : str
        Program name printed before the message.

    Returns
    -------
    int
        ``fn``'s status, 2 after a :class:`Reg2D3DError`, 130 after Ctrl-C.
    """
    import sys

    try:
        rc = fn()
    except Reg2D3DError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0
