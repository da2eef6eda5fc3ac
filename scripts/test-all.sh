#!/usr/bin/env bash
# Runs every check and every test of every Go module in this repository.
# It is the README's test command and what CI runs (.ci/run calls it).
#
#   bash scripts/test-all.sh                # everything, each fuzzer for 50,000 inputs
#   FUZZTIME=1000000x bash scripts/test-all.sh
#
# It installs whatever real component the tests need (redis-server,
# postgresql, prometheus, Chromium and python3-websockets from apt, the e2e suite's pinned npm
# packages; the tests start their own servers), so it works on a fresh
# machine with Go, Node and npm.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
# A count, not a duration: Go 1.26's fuzz coordinator can fail a clean run
# with "context deadline exceeded" when a -fuzztime duration expires
# (golang/go#75804, fixed in Go 1.27); a count has no deadline to race.
fuzztime=${FUZZTIME:-50000x}

step() { printf '\n== %s\n' "$*"; }

# Every module: the root one first, then each go.mod below it.
modules=(.)
while IFS= read -r mod; do
  modules+=("$(dirname "$mod")")
done < <(find . -mindepth 2 -name go.mod -not -path './.git/*' -not -path '*/node_modules/*' | sort)

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
apt_updated=""
apt_install() { # apt_install PACKAGE: install a Debian package once
  step "installing $1 (apt)"
  if [ -z "$apt_updated" ]; then $SUDO apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$1" >/dev/null
}

# The Redis broker's tests start their own redis-server on a free loopback
# port; they need the binary.
if [ -f redisbroker/go.mod ] && ! command -v redis-server >/dev/null; then
  apt_install redis-server
fi

# The PostgreSQL broker's tests (and the e2e chat on PostgreSQL) start their
# own throwaway server: initdb into a temporary directory, run as the
# postgres system user when run as root. Debian's postgresql package
# provides the binaries (in /usr/lib/postgresql/<version>/bin, where the
# tests look too) and the user.
if [ -f pgbroker/go.mod ] && ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt_install postgresql
fi

# The metrics module runs every dashboard query on a real Prometheus that its
# test starts on a free loopback port; it needs the binary.
if [ -f metrics/go.mod ] && ! command -v prometheus >/dev/null; then
  apt_install prometheus
fi

step "gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
  echo "gofmt would change:"; echo "$unformatted"; exit 1
fi

for mod in "${modules[@]}"; do
  cd "$root/$mod"
  step "module $mod: go mod tidy leaves go.mod and go.sum unchanged"
  cp go.mod /tmp/roomcast-go.mod.$$; cp go.sum /tmp/roomcast-go.sum.$$ 2>/dev/null || : > /tmp/roomcast-go.sum.$$
  go mod tidy
  if ! cmp -s go.mod /tmp/roomcast-go.mod.$$ || ! cmp -s go.sum /tmp/roomcast-go.sum.$$; then
    echo "go mod tidy changed go.mod or go.sum in $mod; run it and commit the result"
    cp /tmp/roomcast-go.mod.$$ go.mod; cp /tmp/roomcast-go.sum.$$ go.sum
    exit 1
  fi
  rm -f /tmp/roomcast-go.mod.$$ /tmp/roomcast-go.sum.$$

  step "module $mod: go vet"
  go vet ./...
  if [ "$mod" = . ]; then
    # The core has per-platform files (the epoll poller, raw system calls):
    # it must build, tests included, where it does not run here too.
    for target in linux/386 darwin/arm64 windows/amd64 freebsd/amd64; do
      step "module .: go vet for $target"
      GOOS=${target%/*} GOARCH=${target#*/} go vet ./...
    done
  fi

  step "module $mod: go test -race"
  go test -race -count=1 -timeout 20m ./...

  # Each fuzz target runs for a bounded time; a crash fails the run and
  # leaves its input under testdata/fuzz to become a named regression row.
  for pkg in $(go list ./...); do
    for target in $(go test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true); do
      step "module $mod: fuzz $pkg $target for $fuzztime"
      go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" "$pkg"
    done
  done
done

cd "$root"

# The browser client's unit tests: Node's own test runner, no packages.
step "browser client: node --test js/"
node --test js/

# The real-browser suite needs Debian's Chromium and the pinned npm packages
# of e2e/ (playwright-core drives the system Chromium; it downloads nothing).
if [ -f e2e/package.json ]; then
  if [ ! -x /usr/bin/chromium ]; then
    apt_install chromium
  fi
  # The Python terminal client of examples/python (the tutorials' client).
  if ! /usr/bin/python3 -c 'import websockets' 2>/dev/null; then
    apt_install python3-websockets
  fi
  step "e2e: npm ci"
  (cd e2e && npm ci --no-audit --no-fund --loglevel=error)
  step "e2e: node --test (real Chromium, wscat, Python)"
  (cd e2e && node --test)
fi

step "all checks and tests passed"
