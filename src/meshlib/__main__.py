import sys

from meshlib.cli import main

sys.exit(main())
