#!/usr/bin/env bash
# Create the virtualenv; on a fresh Debian machine python3-venv may be missing, so install it as root.
set -euo pipefail
python=$1 venv=$2
[ -x "$venv/bin/python" ] && exit 0
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "Parley needs Python >= 3.11 as '$python' (set PYTHON=...)." >&2
  exit 1
fi
if ! "$python" -m venv "$venv" 2>/dev/null; then
  rm -rf "$venv"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3-venv python3-dev build-essential >/dev/null
    "$python" -m venv "$venv"
  else
    echo "Cannot create a virtualenv: install python3-venv (sudo apt-get install python3-venv)." >&2
    exit 1
  fi
fi
