"""ondemand's command line: `python run.py [serve|check-config|status] --help`."""

import sys

from ondemand.cli import main

if __name__ == "__main__":
    sys.exit(main())
