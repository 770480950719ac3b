import sys

from ncis.cli import main

sys.exit(main())
