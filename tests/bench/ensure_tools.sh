#!/usr/bin/env bash
# Install the reference server (nginx-light), the load generators (wrk; curl, whose
# --parallel transfers time each response's first byte for the lookup scenarios), PostgreSQL,
# jemalloc (the sidecar's default allocator where installed: proxy/allocator.py) and valgrind
# (`make bench-instructions`) from Debian when missing; a no-op when they are there. Arguments narrow the list:
# `ensure_tools.sh nginx postgres jemalloc` is what the test suite needs, `make bench` the
# default list.
set -euo pipefail
declare -A package=(
  [nginx]=nginx-light [wrk]=wrk [curl]=curl [postgres]=postgresql [jemalloc]=libjemalloc2
  [valgrind]=valgrind
)
tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(nginx wrk curl jemalloc)
missing=()
for tool in "${tools[@]}"; do
  [ -n "${package[$tool]:-}" ] || { echo "ensure_tools: unknown tool '$tool'" >&2; exit 2; }
  if [ "$tool" = jemalloc ]; then  # a library: ld.so's cache knows it, PATH does not
    /sbin/ldconfig -p 2>/dev/null | grep -q 'libjemalloc\.so\.2' || missing+=("${package[$tool]}")
    continue
  fi
  if [ "$tool" = postgres ]; then  # Debian keeps the server binaries off PATH
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null \
      || missing+=("${package[$tool]}")
    continue
  fi
  if [ "$tool" = curl ]; then  # --parallel came with curl 7.66
    curl --help all 2>/dev/null | grep -q -- '--parallel-max' || missing+=("${package[$tool]}")
    continue
  fi
  # nginx lives in /usr/sbin, which is not on every user's PATH.
  PATH="$PATH:/usr/sbin:/usr/local/sbin" command -v "$tool" >/dev/null 2>&1 \
    || missing+=("${package[$tool]}")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
echo "ensure_tools: installing ${missing[*]}" >&2
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
