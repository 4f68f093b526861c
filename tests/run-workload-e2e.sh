#!/usr/bin/env bash
# The whole-way end-to-end test (tests/workload.rs), by its own command: it takes 15-20 minutes
# of both cores under TCG, too long for README's test command. Installs what it needs (Debian
# packages, the pinned tools, kubeadm, crictl and CoreDNS for the node image), builds the node
# image once (cached), then runs the test with its progress and timings on the terminal.
#   CAPL_WORKLOAD_WORKERS=0 tests/run-workload-e2e.sh    the control plane only (about half the time)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
eval "$(tests/tools/install.sh --workload)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CAPL_CACHE_DIR/target}"
exec cargo test --locked --features workload-e2e --test workload -- --nocapture
