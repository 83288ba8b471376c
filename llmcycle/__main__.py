import sys

from llmcycle.cli import main

sys.exit(main())
