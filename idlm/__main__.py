import sys

from idlm.cli import main

sys.exit(main())
