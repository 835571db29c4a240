import os
import sys
from pathlib import Path

# tests/ holds shared helpers (tiny.py) imported as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
