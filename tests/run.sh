#!/usr/bin/env bash
# The README's test command: installs what the tests need, then runs every check.
# Needs root: the end-to-end tests build network namespaces and taps. Nothing is skipped:
# a missing tool or privilege fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/setup.sh

echo "== format and lints" >&2
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== unsafe stays in datapath::io::sys" >&2
offenders=$(grep -rln --include='*.rs' -e 'allow(unsafe_code)' -e 'unsafe {' -e 'unsafe fn' -e 'unsafe impl' \
  datapath control dhcp-dns benches tests | grep -v '^datapath/src/io/sys.rs$' || true)
if [ -n "$offenders" ]; then
  echo "unsafe code outside datapath/src/io/sys.rs: $offenders" >&2
  exit 1
fi

echo "== tests" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# The end-to-end tests run the `switchyard` binary: cargo test alone does not build it for
# another package's tests, so build it first (and so never test a stale one).
cargo build --workspace --bins --quiet
cargo test --workspace 2>&1 | tee "$log" || status=$?
# A short smoke run of each fuzz target from its seeds (the long runs are in
# benches/RESULTS.md); a crash fails the run. The corpus it grows is thrown away.
echo "== fuzz smoke" >&2
fuzz_corpus=$(mktemp -d)
for target in dhcp dns engine nat_fast; do
  mkdir -p "$fuzz_corpus/$target"
  if ! (cd fuzz && cargo fuzz run "$target" -s none -O "$fuzz_corpus/$target" "seeds/$target" \
        -- -max_total_time=15 >"$fuzz_corpus/$target.log" 2>&1); then
    echo "fuzz target $target failed:" >&2
    tail -30 "$fuzz_corpus/$target.log" >&2
    status=1
    echo "test result: FAILED. 0 passed; 1 failed; 0 ignored" >>"$log"
  else
    echo "test result: ok. 1 passed; 0 failed; 0 ignored (fuzz $target)" >>"$log"
  fi
done
rm -rf "$fuzz_corpus"
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
