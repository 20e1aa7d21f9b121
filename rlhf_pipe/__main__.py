import sys

from rlhf_pipe.cli import main

sys.exit(main())
