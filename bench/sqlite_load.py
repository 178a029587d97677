"""SQLite under load (issue 15, item 4): a 200 MB upload validating and a running job whose
progress reads take 1.5 s, while 20 clients list jobs and get a file and a job. Prints the
upload time, list p50/p99/max and any 5xx. The CI-sized run is
tests/platform/test_sqlite_load.py (4 MB); this is the same scenario at full size.

    PYTHONPATH=. .venv/bin/python bench/sqlite_load.py [--mb 200] [--thinking 2000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tests.platform.test_sqlite_load import measure


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200, help="upload size in MB")
    parser.add_argument("--thinking", type=int, default=2000, help="characters of thinking per row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp), upload_bytes=args.mb * 1000 * 1000, thinking=args.thinking)
    result.pop("upload_text")
    print(json.dumps({"upload_mb": args.mb, **result}, indent=2))


if __name__ == "__main__":
    main()
