# Additions to .ci/run (which has `set -euo pipefail` and cds to the repository root).
#
# 1. Before `make test`: the programs the namespace tests need (Debian/Ubuntu).
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    iproute2 nftables coturn >/dev/null

# 2. After `make test`: the NAT traversal suite in network namespaces (needs root).
#    CI=1 makes the suite fail, not skip, when namespaces cannot be created here.
$SUDO env CI=1 PATH="$PATH" make test-network
