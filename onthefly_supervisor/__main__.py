import sys

from onthefly_supervisor.cli import main

sys.exit(main())
