#!/usr/bin/env bash
# Install hisf-bench with its test extra into .venv (torch from this machine's wheels) and run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e '.[test]'
# The HTML report test renders in Debian's headless Chromium; the store tests start a real PostgreSQL server
# (Debian's package puts initdb under /usr/lib/postgresql/<version>/bin, where orchestrator/stores.py looks).
NEED=()
command -v chromium >/dev/null 2>&1 || NEED+=(chromium)
command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || NEED+=(postgresql)
if [ ${#NEED[@]} -gt 0 ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${NEED[@]}" >/dev/null
fi
exec .venv/bin/python -m pytest tests "$@"
