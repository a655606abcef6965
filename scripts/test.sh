#!/usr/bin/env bash
# The README's test command: set-up (idempotent), formatting, lints, then every test in release
# mode (the tests run real models; unoptimised builds would crawl).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh --test
cargo fmt --all --check
cargo clippy --release --workspace --all-targets --locked -- -D warnings
cargo test --release --workspace --locked "$@"
