import signal
import sys

if __name__ == "__main__":
    try:
        from .cli import main
    except KeyboardInterrupt:  # Ctrl-C while Python was still importing
        print("interrupted", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    raise SystemExit(main())
