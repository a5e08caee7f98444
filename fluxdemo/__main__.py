import sys

from fluxdemo.cli import main

sys.exit(main())
