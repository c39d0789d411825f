#!/usr/bin/env bash
# The test command of nbdfault.
#
#   sudo scripts/test.sh            # on a fresh Debian machine (or as root)
#   scripts/test.sh [CARGO TEST ARGS...]
#
# As root it installs the NBD tools the integration tests drive (qemu-utils,
# nbdkit, libnbd-bin, python3-libnbd, nbd-server, fio, curl, tshark) and what the
# Python package's tests need (python3-pytest, and python3-venv, python3-pip,
# python3-setuptools and python3-wheel to pip-install it); otherwise they
# must already be installed. Then it checks formatting, runs clippy with warnings denied and
# runs every test in release mode (the tests move hundreds of MiB through the
# proxy), then the Python package's tests against the binary just built.
# Extra arguments are passed to `cargo test`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() {
    printf '\n==> %s\n' "$*"
}

packages=(qemu-utils nbdkit libnbd-bin python3-libnbd nbd-server fio curl tshark
    python3-pytest python3-venv python3-pip python3-setuptools python3-wheel)

# Prints the missing tools, one per line (nothing if all are there).
missing_tools() {
    local tool
    for tool in qemu-nbd qemu-img qemu-io nbdkit nbdinfo nbdcopy nbd-server fio curl tshark; do
        command -v "$tool" >/dev/null 2>&1 || echo "$tool"
    done
    local module
    for module in nbd pytest pip setuptools wheel; do
        if ! /usr/bin/python3 -c "import $module" >/dev/null 2>&1; then
            echo "python3 module $module (for /usr/bin/python3)"
        fi
    done
}

if [ "$(id -u)" -eq 0 ]; then
    step "Installing test tools: ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update && apt-get install -y "${packages[@]}"; }; then
        # Offline machine with everything already installed: carry on.
        if [ -n "$(missing_tools)" ]; then
            echo "error: apt-get failed and these are missing:" >&2
            missing_tools | sed 's/^/error:   /' >&2
            exit 1
        fi
        echo "warning: apt-get failed, but every tool is already installed; continuing" >&2
    fi
else
    step "Checking test tools (not root: nothing is installed)"
fi
missing="$(missing_tools)"
if [ -n "$missing" ]; then
    echo "error: missing test tools:" >&2
    printf '%s\n' "$missing" | sed 's/^/error:   /' >&2
    echo "error: install them with: sudo apt-get install -y ${packages[*]}" >&2
    echo "error: (or run this script as root: sudo scripts/test.sh)" >&2
    exit 1
fi

step "Checking Rust tools (cargo, rustfmt, clippy)"
if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found; install Rust from https://rustup.rs" >&2
    exit 1
fi
need_components=()
cargo fmt --version >/dev/null 2>&1 || need_components+=(rustfmt)
cargo clippy --version >/dev/null 2>&1 || need_components+=(clippy)
if [ "${#need_components[@]}" -gt 0 ]; then
    if command -v rustup >/dev/null 2>&1; then
        step "Installing Rust components: ${need_components[*]}"
        rustup component add "${need_components[@]}"
    else
        echo "error: missing Rust components: ${need_components[*]} (and no rustup to add them)" >&2
        exit 1
    fi
fi
cargo --version
cargo fmt --version
cargo clippy --version

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo test --release --all-targets $*"
cargo test --release --all-targets "$@"

# --all-targets leaves the doc examples out (the Rust API's, in src/).
step "cargo test --release --doc"
cargo test --release --doc

# The API's documentation builds without a broken link.
step "cargo doc --no-deps (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --release --no-deps --quiet

# The Python package (python/) against the release binary the tests built,
# from the source tree; its tests also pip-install it into a venv.
if [ "$#" -eq 0 ]; then
    step "python package: /usr/bin/python3 -m pytest python/tests"
    NBDFAULT="$(realpath "${CARGO_TARGET_DIR:-target}")/release/nbdfault" \
        /usr/bin/python3 -m pytest -p no:cacheprovider python/tests
fi

# The fuzz crate's tests replay every seed and every past finding
# (fuzz/corpus/, regress-* included) through the fuzz harnesses on stable
# Rust, without libFuzzer's instrumentation: a fixed finding stays fixed.
if [ "$#" -eq 0 ]; then
    step "fuzz seeds and past findings: (cd fuzz && cargo test --release)"
    (cd fuzz && cargo test --release)
fi

step "All checks passed"
