import sys

from clipforge.cli import main

sys.exit(main())
