#!/usr/bin/env bash
# Make sure Debian's chromium is there for the console's browser tests (tests/console), which
# drive it with Playwright through `executable_path`: Playwright's own browser download is
# not reachable from here. Installs it when missing and we can (root with apt-get); otherwise
# says in one line why those tests will be skipped. Never fails: `make test` runs the rest.
set -uo pipefail

found() {  # the same lookup as tests/console/conftest.py
  if [[ -n "${OMNIROUTE_CHROMIUM:-}" ]]; then
    [[ -x "${OMNIROUTE_CHROMIUM}" ]]
    return
  fi
  [[ -x /usr/bin/chromium ]] || command -v chromium >/dev/null 2>&1
}

found && exit 0

if [[ -n "${OMNIROUTE_CHROMIUM:-}" ]]; then
  echo "browser: OMNIROUTE_CHROMIUM=${OMNIROUTE_CHROMIUM} is not an executable; the console's browser tests will be skipped"
  exit 0
fi
if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "browser: no chromium and no way to install it here (needs root and apt-get: apt-get install chromium); the console's browser tests will be skipped"
  exit 0
fi

echo "browser: installing Debian's chromium for the console's browser tests"
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -q --no-install-recommends chromium >/dev/null; }
# The package lists may be missing or stale (a fresh container): update only when needed.
if ! install && ! { apt-get update -q >/dev/null && install; }; then
  echo "browser: apt-get could not install chromium; the console's browser tests will be skipped"
fi
found || echo "browser: chromium still missing; the console's browser tests will be skipped"
exit 0
