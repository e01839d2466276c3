#!/usr/bin/env bash
# Create (or reuse) the project venv and install requirements.txt into it when it changed.
# Sourced by scripts/test.sh and scripts/quickstart.sh; afterwards $PY is the venv's python.
# VENV overrides the location (default: .venv in the repository).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  BASE_PY="$(command -v python3.11 || command -v python3)"
  echo "creating $VENV with $BASE_PY ($("$BASE_PY" --version))"
  "$BASE_PY" -m venv "$VENV"
fi
PY="$VENV/bin/python"
STAMP="$VENV/.requirements.sha256"
WANT="$(sha256sum "$REPO/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "installing requirements.txt into $VENV (about a minute)"
  # (this machine's pip configuration may list local mirror folders that do not exist; hide that noise)
  "$PY" -m pip install --quiet --disable-pip-version-check -r "$REPO/requirements.txt" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "pip install -r requirements.txt failed" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
export PY REPO
