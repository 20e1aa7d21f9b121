#!/usr/bin/env python
"""Same as `rlhf-pipe apply-vllm-patch ...`; usable from a checkout without installing rlhf_pipe."""

import sys
from pathlib import Path

try:
    from rlhf_pipe.vllm_patch.tool import main
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rlhf_pipe.vllm_patch.tool import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
