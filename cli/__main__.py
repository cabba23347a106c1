import sys

from lossd.cli import main

sys.exit(main())
