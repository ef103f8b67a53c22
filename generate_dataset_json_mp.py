#!/usr/bin/env python3
"""Raw folder -> dataset JSON, with several processes. Same as `edittuner dataset`; see --help."""
import sys

from edittuner.cli import main

sys.exit(main(["dataset", *sys.argv[1:]]))
