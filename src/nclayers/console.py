"""The console of one `nclayers` command: where the jobs' log lines go (progress on
stdout, warnings on stderr) and what `-q` silences in the libraries, for that command
only. Imports no torch, so `nclayers --help` stays fast."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator


class _Console(logging.StreamHandler):
    """Progress lines to whatever sys.stdout is when a line is logged, warnings and errors
    (a failed stage, a damaged file) to sys.stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        super().emit(record)


@contextlib.contextmanager
def command_logging(quiet: bool, main_rank: bool) -> Iterator[None]:
    """While the command runs: the jobs' progress lines on stdout (rank 0 only), warnings
    always, on stderr; with `quiet` the libraries' too (`quiet_libraries`). The
    "nclayers" logger is as it was once the command returns, so a library call after an
    in-process `main` logs as it would without it."""
    level = logging.WARNING if quiet or not main_rank else logging.INFO
    handler = _Console()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("nclayers")
    saved = root.handlers[:], root.level, root.propagate
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    try:
        with quiet_libraries() if quiet else contextlib.nullcontext():
            yield
    finally:
        root.handlers[:], root.propagate = saved[0], saved[2]
        root.setLevel(saved[1])


# Read by transformers and submitit when they are imported (and for advisory warnings).
_QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "SUBMITIT_LOG_LEVEL": "ERROR",
}


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """-q: transformers' and huggingface_hub's progress bars (weight loading) and notes,
    and submitit's warnings (e.g. "Bypassing sacct error", at every poll of a cluster
    without accounting), are silenced too, for the command only: the environment
    variables, the libraries' settings and submitit's logger level are restored when it
    returns (a library imported during the command gets its defaults back)."""
    env = {key: os.environ.get(key) for key in _QUIET_ENV}
    submitit = logging.getLogger("submitit")
    submitit_level, submitit_loaded = submitit.level, "submitit.core.logger" in sys.modules
    hub = _hub_bars()
    hub_on = hub is not None and not hub.are_progress_bars_disabled()
    hf = sys.modules.get("transformers.utils.logging")  # imported already: tell it directly
    hf_state = (hf.get_verbosity(), hf.is_progress_bar_enabled()) if hf else None
    os.environ.update(_QUIET_ENV)
    if hub_on:
        hub.disable_progress_bars()  # transformers' bars follow the hub's when imported
    if hf is not None:
        hf.disable_progress_bar()
        hf.set_verbosity_error()
    submitit.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if hub_on:
            hub.enable_progress_bars()
        _restore_transformers(hf_state, hub_on)
        if submitit_loaded or "submitit.core.logger" not in sys.modules:
            submitit.setLevel(submitit_level)
        else:  # imported during the command: the level submitit takes by default
            name = os.environ.get("SUBMITIT_LOG_LEVEL", "INFO").upper()
            if name != "NOCONFIG":
                submitit.setLevel(int(name) if name.isdigit() else name)


def _hub_bars():
    """huggingface_hub's progress-bar switches, where it is installed and no
    HF_HUB_DISABLE_PROGRESS_BARS of the user's decides them (else None)."""
    import importlib.util

    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is not None:
        return None
    if importlib.util.find_spec("huggingface_hub") is None:
        return None
    import huggingface_hub.utils as hub

    return hub


def _restore_transformers(state: tuple[int, bool] | None, bars: bool) -> None:
    """transformers' verbosity and progress bars as before the command (`state`), or,
    imported during it, its defaults (bars on where the hub's were, `bars`)."""
    hf = sys.modules.get("transformers.utils.logging")
    if hf is None:
        return
    if state is not None:
        verbosity, bars = state
    else:
        default = getattr(hf, "_get_default_logging_level", lambda: logging.WARNING)
        verbosity = default()
    hf.set_verbosity(verbosity)
    if bars:
        hf.enable_progress_bar()
    else:
        hf.disable_progress_bar()


__all__ = ["command_logging", "quiet_libraries"]
