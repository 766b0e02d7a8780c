"""Regenerate docs/img/report.png, the README's screenshot of the report, with headless Chromium.

    hdopt report                                 # writes report/index.html
    python scripts/report_screenshot.py          # -> docs/img/report.png (the top of the page)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, default=Path("report/index.html"))
    parser.add_argument("--out", type=Path, default=Path("docs/img/report.png"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1400, help="pixels of the page's top to capture")
    args = parser.parse_args(argv)
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        sys.exit("no Chromium found: install it (Debian: apt install chromium)")
    if not args.report.is_file():
        sys.exit(f"{args.report} not found: run `hdopt report` first")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   f"--window-size={args.width},{args.height}", f"--screenshot={shot}",
                   args.report.resolve().as_uri()]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, timeout=120)
        shutil.move(shot, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
