#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment from requirements.txt
# (`setup_env.sh test` adds requirements-test.txt, the test tools).
# Re-installs only when a requirements file changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
FILES=(requirements.txt)
[ "${1:-}" = "test" ] && FILES+=(requirements-test.txt)
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.requirements-${1:-run}.sha256"
WANT="$(cat "${FILES[@]}" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing ${FILES[*]} into $VENV (first time: several minutes)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "${FILES[@]/#/-r}"
  echo "$WANT" > "$STAMP"
fi
