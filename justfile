# devsync tasks. `just` lists them; the README explains the two that matter (`up`, `test`).
set shell := ["bash", "-euo", "pipefail", "-c"]

# list the recipes
default:
    @just --list

# install pinned tools (nats-server) into .tools/ and check PostgreSQL binaries
setup:
    bash scripts/setup.sh

# start the local stack (NATS + PostgreSQL + topology) until Ctrl-C; flags go to `devsyncctl up`
up *ARGS: setup
    cargo run --release -q -p devsync-ctl -- up {{ARGS}}

# run the whole test suite against real NATS and a private PostgreSQL, then the chart tests
test: setup
    cargo build -q -p devsync-testkit --bin devsync-testenv
    target/debug/devsync-testenv cargo nextest run --workspace --no-fail-fast
    bash scripts/chart-test.sh
    cargo build -q --bins
    target/debug/devsync-chaos --quick --out target/chaos-results

# coverage-guided fuzzing of the device message checks for SECONDS (cargo-fuzz; stable toolchain)
fuzz SECONDS="60":
    command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
    mkdir -p fuzz/target/corpus
    cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run ingress target/corpus corpus/ingress -s none -- -max_total_time={{SECONDS}}

# the chaos suite at full size: faults under load, then the checker; prints the reliability table
chaos *ARGS: setup
    cargo build --release -q --bins
    target/release/devsync-chaos {{ARGS}}

# formatting and lints, as CI runs them
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# the Helm chart: lint, render, validate, assert on the rendered output
chart-test: setup
    bash scripts/chart-test.sh

# the benchmarks: raw limits and end-to-end scenarios (`just bench --quick` takes about a minute)
bench *ARGS: setup
    cargo build --release -q --bins
    target/release/devsync-bench {{ARGS}}

# everything CI checks
verify: lint test
