#!/usr/bin/env bash
# Makes sure Debian's Chromium (/usr/bin/chromium) is installed for the console's browser tests
# (tests/test_console_browser.py drives it with Playwright; Playwright's own browser downloads
# are not used). Installs the package when it is missing and we may (root, or sudo without a
# password); otherwise says so, and those tests fail with the same advice.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
  exit 0
fi

as_root=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
  else
    echo "Chromium (/usr/bin/chromium) not found and cannot install it (not root): install" \
         "Debian's 'chromium' package, or the console's browser tests will fail." >&2
    exit 0
  fi
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "Chromium (/usr/bin/chromium) not found and apt-get is not available: install Chromium" \
       "at /usr/bin/chromium, or the console's browser tests will fail." >&2
  exit 0
fi

echo "Installing Chromium (Debian package 'chromium') for the console's browser tests..."
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
if ! apt-cache show chromium >/dev/null 2>&1; then
  echo "This system's package sources have no 'chromium' package (it is Debian's; Ubuntu ships" \
       "it as a snap): install Chromium at /usr/bin/chromium, or the console's browser tests" \
       "will fail." >&2
  exit 0
fi
# Fonts too: without recommended packages a minimal system may have none to draw text with.
"${as_root[@]}" apt-get install -y -qq --no-install-recommends \
  chromium fonts-dejavu-core fonts-liberation >/dev/null
