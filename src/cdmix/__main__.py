import sys

from cdmix.cli import main

sys.exit(main())
