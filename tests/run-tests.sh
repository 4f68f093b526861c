#!/usr/bin/env bash
# README's test command: installs what the tests need, then runs every check and test.
#   - Debian packages and the pinned Go-built tools (tests/tools/install.sh; cached by version);
#   - cargo fmt --check, cargo clippy -D warnings, cargo test (unit, integration, doc tests).
# The cargo target dir lives in the cache outside the clone, so warm runs rebuild little.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
start=$SECONDS
step() { printf '\n==> %s (%ss)\n' "$*" "$((SECONDS - start))"; }

step "installing the test bed's tools"
eval "$(tests/tools/install.sh)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CAPL_CACHE_DIR/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --locked --all-targets --all-features -- -D warnings

step "real components of the test bed"
cargo run --locked --quiet --example testbed -- versions

step "cargo test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --locked --doc 2>&1 | tee "$log"
cargo test --locked --all-targets 2>&1 | tee -a "$log"

step "done in $((SECONDS - start))s"
# One closing line over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
