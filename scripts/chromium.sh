#!/usr/bin/env bash
# The browser tests use Debian's Chromium: Playwright's own browser download cannot work on
# machines that only reach package registries.
set -euo pipefail

if [ -n "${AICREDITS_CHROMIUM:-}" ] && [ -x "${AICREDITS_CHROMIUM}" ]; then
  exit 0
fi
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
echo "[chromium] installing Debian's chromium package"
if [ "$(id -u)" -eq 0 ]; then
  apt_get=(apt-get)
elif command -v sudo >/dev/null; then
  apt_get=(sudo apt-get)
else
  echo "[chromium] need root to apt-get install chromium (or set AICREDITS_CHROMIUM)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${apt_get[@]}" update -qq
"${apt_get[@]}" install -y -qq --no-install-recommends chromium >/dev/null
/usr/bin/chromium --version
