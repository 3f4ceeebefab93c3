"""``python -m orchestrator.simulator``: run the simulated engine."""
import sys

from orchestrator.simulator.cli import main

sys.exit(main())
