#!/bin/sh
# runnerd's set-up, on a fresh Debian 12 machine, as root:
#
#   ./bootstrap.sh demo    set everything up, then run the demo job through a real daemon
#   ./bootstrap.sh test    set everything up, then run the tests (extra arguments go to pytest)
#   ./bootstrap.sh setup   set everything up, nothing else
#   ./bootstrap.sh hosttest  the installed service on a real systemd host: a Debian 12
#                          VM built and booted here (hosttest/host.py; ~25 min)
#   ./bootstrap.sh image   the container image, from Debian's packages and PyPI alone
#                          (deploy/image.py; cached: rebuilt when its inputs change)
#
# "Everything": the Debian packages env/debian-packages names, the host venv at .venv/ (runnerd
# and its test tools), and the sandbox env (the pinned library set, hash-checked,
# at /var/lib/runnerd/env). Each step checks first and does nothing when done, so
# running it again is safe and quick.
set -eu
cd "$(dirname "$0")"

mode=${1:-}
case "$mode" in
    demo | test | setup | hosttest | image) shift ;;
    *) echo "usage: $0 demo | test [pytest args] | setup | hosttest [host test args] | image [--save FILE]" >&2; exit 2 ;;
esac
if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: run as root: runnerd's cages need nsjail, cgroups and mounts" >&2
    exit 2
fi

say() { echo "bootstrap: $*"; }
LINTED="runnerd tests hosttest deploy examples"
UNIT_TESTS="tests/test_units.py tests/test_scheduler.py tests/test_fairness.py tests/test_fleet_units.py tests/test_manifests.py"

# 1. Debian packages (env/debian-packages: the set-up's, plus this mode's own).
packages() { sed -n "s/^$1:[[:space:]]*//p" env/debian-packages; }
wanted="$(packages setup)"
case "$mode" in
    test) wanted="$wanted $(packages test) $(packages image)" ;;  # the tests build and run the image
    hosttest | image) wanted="$wanted $(packages "$mode")" ;;
esac
missing=""
for pkg in $wanted; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $pkg"
    fi
done
if [ -n "$missing" ]; then
    say "installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi

# 2. The host venv: runnerd itself, editable, with its test tools.
if [ ! -x .venv/bin/python ]; then
    say "creating .venv from /usr/bin/python3"
    /usr/bin/python3 -m venv .venv
fi
stamp=.venv/.runnerd-installed
want=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing runnerd into .venv"
    .venv/bin/pip install --disable-pip-version-check -q -e '.[test]'
    echo "$want" > "$stamp"
fi

# 3. The sandbox env (skipped when it matches env/requirements.lock). The host
# test's guest and the image build their own.
if [ "$mode" != hosttest ] && [ "$mode" != image ]; then
    .venv/bin/runnerd env build
fi

case "$mode" in
setup)
    say "ready: .venv/bin/runnerd"
    ;;
test)
    if [ $# -gt 0 ]; then
        exec .venv/bin/python -m pytest -q --durations=15 "$@"
    fi
    # The whole suite: the cheap checks first, so a slip shows in seconds.
    say "lint: ruff, ruff format, mypy"
    .venv/bin/ruff check $LINTED
    .venv/bin/ruff format --check $LINTED
    .venv/bin/mypy
    say "the unit layer (no cage)"
    .venv/bin/python -m pytest -q $UNIT_TESTS
    say "the cage, the daemon, the service"
    exec .venv/bin/python -m pytest -q --durations=15 $(for t in $UNIT_TESTS; do echo "--ignore=$t"; done)
    ;;
hosttest)
    exec .venv/bin/python -m hosttest.host "$@"
    ;;
image)
    exec .venv/bin/python -m deploy.image "$@"
    ;;
demo)
    sockdir=/run/runnerd-demo
    endpoint="ipc://$sockdir/demo.sock"
    log=$(mktemp /tmp/runnerd-demo.XXXXXX.log)
    .venv/bin/runnerd serve --bind "$endpoint" >"$log" 2>&1 &
    daemon=$!
    trap 'kill -TERM $daemon 2>/dev/null; wait $daemon 2>/dev/null || true' EXIT INT TERM
    tries=0
    until .venv/bin/runnerd ping --endpoint "$endpoint" --timeout 1 >/dev/null 2>&1; do
        tries=$((tries + 1))
        if ! kill -0 $daemon 2>/dev/null || [ $tries -gt 60 ]; then
            echo "bootstrap: the daemon did not come up; its log:" >&2
            cat "$log" >&2
            exit 1
        fi
        sleep 0.5
    done
    say "daemon up at $endpoint (log: $log); running examples/demo.py with examples/sales.csv"
    echo
    status=0
    .venv/bin/runnerd run examples/demo.py --input examples/sales.csv --out demo-out \
        --endpoint "$endpoint" || status=$?
    echo
    .venv/bin/runnerd stats --endpoint "$endpoint" | head -3
    kill -TERM $daemon
    wait $daemon || true
    trap - EXIT INT TERM
    if [ $status -eq 0 ]; then
        say "done: the figures are in $(pwd)/demo-out/"
    fi
    exit $status
    ;;
esac
