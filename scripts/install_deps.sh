#!/usr/bin/env bash
# Installs the Debian packages longtape builds with, when missing. As root it installs them;
# otherwise it prints the exact command to run and fails.
set -euo pipefail
packages=(cmake g++ ninja-build pkg-config libeigen3-dev doctest-dev libcli11-dev nlohmann-json3-dev libstb-dev)
optional=(gnuplot-nox)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
want_optional=()
if [ "${LONGTAPE_WITH_PLOTS:-0}" = 1 ]; then
  for p in "${optional[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || want_optional+=("$p")
  done
fi
if [ ${#missing[@]} -eq 0 ] && [ ${#want_optional[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "longtape needs these Debian packages: ${missing[*]} ${want_optional[*]}" >&2
  echo "install them with: sudo apt-get update && sudo apt-get install -y ${missing[*]} ${want_optional[*]}" >&2
  exit 1
fi
echo "installing: ${missing[*]} ${want_optional[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" "${want_optional[@]}" >/dev/null
