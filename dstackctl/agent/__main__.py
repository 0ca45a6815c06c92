import sys

from dstackctl.agent.process import main

sys.exit(main())
