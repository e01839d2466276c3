#!/usr/bin/env bash
# The test command: set up the venv when needed, then run the whole test suite.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$REPO"
exec "$PY" -m pytest "$@"
