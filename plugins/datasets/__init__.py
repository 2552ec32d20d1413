"""Built-in task plugins: protocols and the data sources they draw episodes from."""
from pathlib import Path

#: Committed class-split files of the built-in data sets (each checked by SHA-256 when read).
SPLITS_DIR = Path(__file__).with_name("splits")
