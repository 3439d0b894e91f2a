import sys

from loadtests.cli import main

sys.exit(main())
