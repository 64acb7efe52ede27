#!/usr/bin/env bash
# The README's main command: installs what the demo uses, builds switchyard, and runs
# `switchyard demo` (guests in fresh network namespaces on the embedded default network).
set -euo pipefail
cd "$(dirname "$0")/.."
tests/setup.sh
cargo build --release --quiet -p switchyard
exec target/release/switchyard demo "$@"
