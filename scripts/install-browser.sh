#!/usr/bin/env bash
# The browser the dashboard tests drive: Debian's chromium and chromium-driver (chromedriver).
# Installs them with apt-get when they are missing (as root, or through sudo); does nothing when
# both are there. `make test` runs it first.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then
        sudo="sudo"
    else
        echo "install-browser: chromium and chromium-driver are missing, and installing them needs root" >&2
        echo "  (apt-get install chromium chromium-driver)" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null; then
    echo "install-browser: no apt-get here; install Chromium and its chromedriver so that \`chromium\` and \`chromedriver\` are on PATH" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends chromium chromium-driver
command -v chromium >/dev/null && command -v chromedriver >/dev/null
