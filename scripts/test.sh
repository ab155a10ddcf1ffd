#!/usr/bin/env bash
# Run ekf-plugin's test suite: installs (or updates) ./.venv first, then runs pytest.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/install.sh"
cd "$here"
exec "${VENV:-$here/.venv}/bin/python" -m pytest "$@"
