import sys

from mbrec.cli.main import main

sys.exit(main())
