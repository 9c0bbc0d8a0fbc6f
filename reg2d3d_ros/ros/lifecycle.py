"""Start and stop rclpy in the project's processes: Ctrl-C and SIGTERM end them cleanly.

rclpy's own signal handler shuts the context down from a signal thread, which makes a blocked
``spin_once`` raise ``ExternalShutdownException`` (a traceback for a user's Ctrl-C) and can race
with ``destroy_node``/``shutdown``. The processes here install no rclpy handler; SIGINT and
SIGTERM set a :class:`threading.Event` that their loops poll (every ``spin_once`` timeout), and
they then destroy their nodes and shut rclpy down themselves, in order.

Fast DDS can hang while deleting a participant that used the TCP part of the large-data
transport (eProsima/Fast-DDS#2010: ``TCPTransportInterface::clean()`` waits on a channel thread).
:func:`shutdown_ros` therefore runs the teardown in a helper thread and gives up after a
timeout; :func:`exit_status` then ends the process with ``os._exit`` (after flushing output),
since the interpreter's own exit would wait on the same teardown. Everything the process must
keep (a bag being recorded) is closed *before* the teardown.

SIGUSR1 makes these processes print every thread's Python stack to stderr (``faulthandler``):
the tests send it to a process that does not stop in time, so that a hang explains itself.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading

_TEARDOWN_HUNG = False


def enable_stack_dumps() -> None:
    """SIGUSR1 prints every thread's Python stack to stderr (call first thing in ``main``)."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)


def init_ros(args: list[str] | None = None) -> threading.Event:
    """Initialise rclpy without its signal handlers; returns the event SIGINT/SIGTERM set.

    Parameters
    ----------
    args : list of str, optional
        Command-line arguments for rclpy (``--ros-args ...``); default none.

    Returns
    -------
    threading.Event
        Set when the process receives SIGINT or SIGTERM; loops stop when it is set.
    """
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    stop = threading.Event()
    rclpy.init(args=args if args is not None else ["--ros-args"], signal_handler_options=SignalHandlerOptions.NO)

    def _on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
    return stop


def shutdown_ros(*nodes, timeout_s: float = 5.0) -> bool:
    """Destroy ``nodes`` (``None`` entries skipped) and shut rclpy down, within ``timeout_s``.

    Returns
    -------
    bool
        True if the teardown finished; False if it hung (then :func:`exit_status` ends the
        process without waiting for it).
    """
    import rclpy

    def teardown():
        for node in nodes:
            if node is not None:
                node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()

    t = threading.Thread(target=teardown, name="ros-teardown", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        global _TEARDOWN_HUNG
        _TEARDOWN_HUNG = True
        print(f"warning: the middleware did not shut down within {timeout_s:.0f} s (known Fast DDS TCP teardown hang); exiting anyway",
              file=sys.stderr, flush=True)
        return False
    return True


def exit_status(rc: int) -> int:
    """Return ``rc``, or end the process now with it if the ROS teardown hung."""
    if _TEARDOWN_HUNG:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc
