"""The `engram-hf` command line."""

from __future__ import annotations

import logging
import signal
import sys

from .commands import build_parser


def _terminate(signum, frame) -> None:
    """SIGTERM ends a command like Ctrl-C does: through its cleanup (a conversion removes its temporary folder)."""
    raise SystemExit(128 + signum)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (the command may run inside a caller that redirects it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _show_library_log() -> None:
    """The library's progress messages (planned sizes, verification, leftovers) on stderr."""
    log = logging.getLogger("engram_hf")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    _show_library_log()
    try:
        return args.run(args) or 0
    except (ValueError, OSError) as error:  # bad input, existing output, full disk, read-only folder, network
        print(f"engram-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
