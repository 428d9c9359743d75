#!/usr/bin/env bash
# Make sure Debian's Chromium is installed for the browser tests (tests/web/), which drive it with
# Playwright for Python. Never a browser downloaded by `playwright install`: only the apt package.
set -euo pipefail
chromium=${PARLEY_CHROMIUM:-/usr/bin/chromium}
[ -x "$chromium" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "Chromium is not installed at $chromium: run 'sudo apt-get install chromium' (or set PARLEY_CHROMIUM)." >&2
  exit 1
fi
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
[ -x "$chromium" ] || { echo "apt-get installed chromium, but $chromium is still missing" >&2; exit 1; }
