#!/usr/bin/env bash
# The README's test command: set-up (idempotent), formatting, lints, then every test in release
# mode (the tests run real models; unoptimised builds would crawl).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh --test
cargo fmt --all --check
cargo clippy --release --workspace --all-targets --locked -- -D warnings
# The end-to-end tests in tests/ run the workspace's binaries: build them first (cargo only
# builds a package's binaries for that package's own integration tests). --all-targets builds
# them with the features the tests unify (dev-dependencies), so `cargo test` rebuilds nothing.
cargo build --release --workspace --all-targets --locked
cargo test --release --workspace --locked "$@"
