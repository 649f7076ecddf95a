import sys

from zimage_server.cli import main

sys.exit(main())
