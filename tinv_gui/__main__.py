import os
import signal
import sys

if __name__ == "__main__":
    try:
        from .cli import main
    except KeyboardInterrupt:  # Ctrl-C while Python was still importing
        print("interrupted", file=sys.stderr)
        status = 128 + signal.SIGINT
    else:
        status = main()
    if status == 128 + signal.SIGINT:
        # A Ctrl-C that went through a library's embedded Python call while it loaded (pybind11's
        # exec, say) leaves CPython set to end the process by SIGINT at exit whatever status is
        # given; everything is saved and said by now, so leave with ours.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    raise SystemExit(status)
