"""lalign's one logger: progress lines and messages as plain lines, from process 0 only.

    log.info("[maskembed] step 120/2000 | loss 0.074 | ...")   # stdout, the console a person watches
    log.note("[export] wrote HF SiglipVisionModel to out/")      # stderr: tools whose stdout is data use this

Both are the standard `logging` loggers `lalign` and `lalign.notes` (so a caller can silence, redirect or format
them); their handlers write to the process's *current* sys.stdout / sys.stderr, and on a multi-host job hosts
other than process 0 say nothing (every host runs the same program: one of them speaks).
"""
from __future__ import annotations

import logging
import sys


class _Console(logging.Handler):
    def __init__(self, stream_name: str):
        super().__init__()
        self.stream_name = stream_name

    def emit(self, record):
        stream = getattr(sys, self.stream_name)
        stream.write(self.format(record) + "\n")
        stream.flush()


class _ProcessZero(logging.Filter):
    def filter(self, record) -> bool:
        jax = sys.modules.get("jax")  # not imported: a single process
        return jax is None or jax.process_index() == 0


def _logger(name: str, stream_name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = _Console(stream_name)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_ProcessZero())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # absl's root handler would print every line a second time, prefixed
    return logger


_OUT = _logger("lalign", "stdout")
_NOTES = _logger("lalign.notes", "stderr")


def info(msg: str) -> None:
    """A progress line or message for the person watching (stdout, process 0)."""
    _OUT.info(msg)


def note(msg: str) -> None:
    """A message beside a tool's data output (stderr, process 0): export's notes while stdout carries its JSON."""
    _NOTES.info(msg)
