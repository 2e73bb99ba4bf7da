"""``python -m bayescal``: the command line."""

import sys

if __name__ == "__main__":
    try:
        from bayescal.cli import main
    except KeyboardInterrupt:  # Ctrl-C while Python is still importing the command line
        print("bayescal: error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
