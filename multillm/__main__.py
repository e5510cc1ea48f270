import sys

from multillm.cli import main

sys.exit(main())
